"""The learner (LRS: MAPPO with the request encoder and expert demonstrations). trainerd runs it
on fleet experience and lab runs it in the simulator; neither imports the other. Needs torch."""
