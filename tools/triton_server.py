"""Build and run a real Triton Inference Server 2.51 serving deploy/triton/model_repository.

    python tools/triton_server.py              # build var/triton-venv once, serve on :8001
    python tools/triton_server.py --bench      # ... and print single / batch-32 latencies
    python tools/triton_server.py --build-only

Then edged with `embedder = "triton"` and `triton_url = "127.0.0.1:8001"` embeds through it.

Where the server comes from: the PyPI wheel nvidia-pytriton 0.7.0 carries a tritonserver 2.51
binary with only the Python backend, plus that backend's stub for each Python version. The
stub embeds the Python that runs the model, so the model's environment is a venv of its own
(var/triton-venv) with what model.py needs:
  * numpy < 2: with numpy 2 the model loads, then the first request kills the stub (its
    triton_python_backend_utils.deserialize_bytes_tensor misreads the TEXT tensor);
  * onnxruntime and tokenizers at the versions in constraints.txt, so the served vectors are
    the in-process embedder's (bit for bit here);
  * nvidia-pytriton installed --no-deps: only its binaries are used, not its Python API.
At run time (measured): PATH must start with the venv's bin, since the stub finds its
site-packages from `python3` on PATH (without it: ModuleNotFoundError: onnxruntime). And
LD_LIBRARY_PATH gets the lib dir of the Python the venv was made from, so that the stub
loads that Python's libpython3.X.so, not whichever one the system loader finds first.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / "var" / "triton-venv"
REPOSITORY = ROOT / "deploy" / "triton" / "model_repository"
PYTRITON = "nvidia-pytriton==0.7.0"  # bundles tritonserver 2.51.0
NUMPY = "numpy==1.26.4"  # the newest numpy 1.x (the stub's numpy ABI)
# Versions of these come from constraints.txt: the same as the in-process embedder's.
SAME_AS_EDGE = ("onnxruntime", "tokenizers")
MODEL = "minilm"


class TritonUnavailable(RuntimeError):
    """Triton cannot be built or started on this machine; the message says why."""


def _pins(names: tuple[str, ...]) -> list[str]:
    text = (ROOT / "constraints.txt").read_text()
    pins = []
    for name in names:
        match = re.search(rf"^{re.escape(name)}==(\S+)$", text, re.MULTILINE)
        if match is None:
            raise TritonUnavailable(f"{name} is not pinned in constraints.txt")
        pins.append(f"{name}=={match.group(1)}")
    return pins


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _site_packages(venv: Path) -> Path:
    out = subprocess.run([str(_venv_python(venv)), "-c",
                          "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def _libdir(venv: Path) -> Path:
    """The lib dir of the Python the venv was made from (where libpython3.X.so lives)."""
    out = subprocess.run([str(_venv_python(venv)), "-c",
                          "import sysconfig as s; print(s.get_config_var('LIBDIR'))"],
                         check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def server_dir(venv: Path = VENV) -> Path:
    return _site_packages(venv) / "pytriton" / "tritonserver"


def is_built(venv: Path = VENV) -> bool:
    return (venv / ".velo-built").is_file()


def build(venv: Path = VENV, python: str = sys.executable, log=print) -> None:
    """Make `venv` with tritonserver and the model's packages (about 30 s with a warm pip
    cache). Raises TritonUnavailable with the reason where that cannot work here."""
    if sys.platform != "linux":
        raise TritonUnavailable(f"tritonserver wheels are Linux-only (this is {sys.platform})")
    marker = venv / ".velo-built"
    wanted = " ".join([PYTRITON, NUMPY, *_pins(SAME_AS_EDGE)])
    if marker.is_file() and marker.read_text() == wanted:
        return
    shutil.rmtree(venv, ignore_errors=True)
    log(f"[triton] creating {venv}")
    made = subprocess.run([python, "-m", "venv", str(venv)], capture_output=True, text=True)
    if made.returncode != 0:  # e.g. Debian's python3 without python3-venv
        raise TritonUnavailable(f"{python} -m venv failed: {made.stderr.strip()[-500:]}")
    pip = [str(_venv_python(venv)), "-m", "pip", "install", "--quiet",
           "--disable-pip-version-check"]
    for step, args in (("tritonserver 2.51 (nvidia-pytriton, binaries only)",
                        ["--no-deps", PYTRITON]),
                       ("the model's packages", [NUMPY, *_pins(SAME_AS_EDGE)])):
        log(f"[triton] installing {step}")
        done = subprocess.run(pip + args, capture_output=True, text=True)
        if done.returncode != 0:
            raise TritonUnavailable(f"pip install {' '.join(args)} failed: "
                                    f"{(done.stderr or done.stdout).strip()[-800:]}")
    _install_stub(venv)
    marker.write_text(wanted)
    log("[triton] built")


def _install_stub(venv: Path) -> None:
    """The Python backend runs backends/python/triton_python_backend_stub; the wheel keeps
    one per Python version aside (pytriton copies the right one at run time, as here)."""
    version = subprocess.run([str(_venv_python(venv)), "-c",
                              "import sys; print('%d.%d' % sys.version_info[:2])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    server = server_dir(venv)
    stub = server / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonUnavailable(f"{PYTRITON} has no Python backend stub for Python {version}")
    libdir = _libdir(venv)
    if not list(libdir.glob(f"libpython{version}*.so*")):
        raise TritonUnavailable(
            f"no libpython{version}.so in {libdir}: the Python that made {venv} was built "
            "without --enable-shared, and the backend stub needs its shared library")
    shutil.copy2(stub, server / "backends" / "python" / "triton_python_backend_stub")


def server_env(venv: Path = VENV) -> dict[str, str]:
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(_libdir(venv)), env.get("LD_LIBRARY_PATH", "")) if p)
    env["PATH"] = os.pathsep.join((str(venv / "bin"), env.get("PATH", "")))
    env.pop("PYTHONHOME", None)  # would point the stub's Python elsewhere
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TritonServer:
    """A tritonserver process on loopback serving `repository`; a context manager."""

    def __init__(self, venv: Path = VENV, repository: Path = REPOSITORY,
                 grpc_port: int = 0, http_port: int = 0, metrics_port: int = 0,
                 address: str = "127.0.0.1", log_path: Path | None = None) -> None:
        self.venv, self.repository, self.address = venv, repository, address
        self.grpc_port, self.http_port, self.metrics_port = (
            p or free_port() for p in (grpc_port, http_port, metrics_port))
        self.log_path = log_path or venv / f"tritonserver-{self.grpc_port}.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The gRPC address for tritonclient / edged's triton_url."""
        return f"{self.address}:{self.grpc_port}"

    def command(self) -> list[str]:
        server = server_dir(self.venv)
        return [
            str(server / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            f"--backend-directory={server / 'backends'}",
            f"--grpc-address={self.address}", f"--grpc-port={self.grpc_port}",
            f"--http-address={self.address}", f"--http-port={self.http_port}",
            f"--metrics-address={self.address}", f"--metrics-port={self.metrics_port}",
            # Python-backend shared memory regions are named by this prefix: two servers on
            # one machine with the default prefix would collide.
            f"--backend-config=python,shm-region-prefix-name=velo{self.grpc_port}_",
            # config.pbtxt is complete: no extra start of the model only to fill it in.
            "--disable-auto-complete-config",
            "--pinned-memory-pool-byte-size=0",  # CPU only: no pinned host buffers
            "--allow-gpu-metrics=false",
            "--exit-timeout-secs=5",
        ]

    def start(self, timeout_s: float = 120.0) -> TritonServer:
        if not is_built(self.venv):
            raise TritonUnavailable(f"{self.venv} is not built; run: python tools/triton_server.py "
                                    "--build-only")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(self.command(), env=server_env(self.venv),
                                        stdout=log, stderr=subprocess.STDOUT)
        log.close()
        ready = f"http://{self.address}:{self.http_port}/v2/models/{MODEL}/ready"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TritonUnavailable(f"tritonserver exited ({self.process.returncode}): "
                                        f"{self.log_errors()}")
            try:
                with urllib.request.urlopen(ready, timeout=1.0) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise TritonUnavailable(f"model {MODEL} not ready after {timeout_s} s: "
                                f"{self.log_errors()}")

    def log_errors(self, chars: int = 1500) -> str:
        """The server log's error lines (E...) and last line: why it did not come up."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return f"(no log at {self.log_path})"
        errors = [line for line in lines if re.match(r"E\d{4} ", line)] + lines[-1:]
        return "\n".join(errors)[:chars] + f" (log: {self.log_path})"

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)  # unloads the model, then exits
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def bench(url: str) -> None:
    """Single-text and batch-32 latency through the client edged uses (median of runs)."""
    from velo.edge.triton_embedder import TritonEmbedder

    embedder = TritonEmbedder(url)
    texts = [f"How do I configure the cache for tenant number {i} in production?"
             for i in range(32)]
    embedder.embed(texts)  # warm up
    for name, batch, runs in (("single", texts[:1], 50), ("batch 32", texts, 10)):
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            embedder.embed(batch)
            times.append(time.perf_counter() - start)
        times.sort()
        print(f"[triton] {name}: median {times[len(times) // 2] * 1000:.1f} ms "
              f"over {runs} runs")
    embedder.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=VENV,
                        help="the model's Python environment (built when missing)")
    parser.add_argument("--repository", type=Path, default=REPOSITORY,
                        help="the Triton model repository to serve")
    parser.add_argument("--address", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (edged's)")
    parser.add_argument("--http-port", type=int, default=8000, help="HTTP port (health)")
    parser.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port")
    parser.add_argument("--build-only", action="store_true", help="build the venv, then exit")
    parser.add_argument("--bench", action="store_true",
                        help="print single and batch-32 latencies once the model is ready")
    args = parser.parse_args()
    try:
        build(args.venv)
        if args.build_only:
            return
        server = TritonServer(args.venv, args.repository, args.grpc_port, args.http_port,
                              args.metrics_port, args.address,
                              log_path=args.venv / "tritonserver.log")
        with server:
            print(f"[triton] ready: gRPC {server.url} (edged triton_url), "
                  f"log {server.log_path}", flush=True)
            if args.bench:
                bench(server.url)
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: stop the server
                server.process.wait()  # type: ignore[union-attr]
    except TritonUnavailable as exc:
        sys.exit(f"[triton] {exc}")


if __name__ == "__main__":
    main()
