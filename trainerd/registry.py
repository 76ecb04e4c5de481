"""Policy registry: versioned ONNX policies on disk, checked against the policy contract.

Layout under data_dir/policies/:

    v000001.onnx, v000002.onnx, ...   the policies, never rewritten
    index.json                        {"policies": [{version, sha256, name, created_unix,
                                       size_bytes}, ...]}

Both are written atomically (temporary file, fsync, rename). A policy file is written before
its index entry, so a crash in between leaves an unlisted file; its version is still never
reused, which keeps versions monotonic across restarts.

The contract (see velo.core.state): inputs correlation [B, 3, P], embedding [B, H] and
action_mask [B, 3], output probs [B, 3], all float32.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import external_data_helper

from velo.core.bad_input import clip
from velo.core.policy import OnnxPolicy
from velo.core.policy import PolicyRejected as PolicyRejected  # raised by publish

_FILE = re.compile(r"v(\d+)\.onnx")
_NAME = re.compile(r"[A-Za-z0-9_.:+-]{1,128}")  # always fullmatch

# name -> (shape as documented, {axis: required size}) of every tensor in the contract.
_INPUTS = {
    "correlation": ("[batch, 3, P]", {1: 3}),
    "embedding": ("[batch, H]", {}),
    "action_mask": ("[batch, 3]", {1: 3}),
}
_LOAD_INPUT = {"load": ("[batch, 2]", {1: 2})}  # only in load-aware policies (velo.core.load)
_OUTPUTS = {"probs": ("[batch, 3]", {1: 3})}


class PolicyTooLarge(PolicyRejected):
    """A policy is larger than the registry accepts."""


class PolicyCorrupted(RuntimeError):
    """A stored policy file no longer matches the sha256 it was published with."""


class PolicyNotFound(LookupError):
    """No policy has that version (or none was published yet)."""


@dataclass(frozen=True)
class PolicyInfo:
    version: int
    sha256: str
    name: str
    created_unix: float
    size_bytes: int


class PolicyRegistry:
    """Versioned ONNX policies in `root`, and a way for watchers to wait for new ones."""

    def __init__(self, root: str | Path, max_bytes: int,
                 edge_shape: tuple[int, int] = (5, 384)) -> None:
        """`edge_shape`: the edges' (P, H), the state shape a policy is probed on."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.edge_shape = max_bytes, edge_shape
        self._index_path = self.root / "index.json"
        self._policies = self._load_index()  # ordered by version
        # The highest version ever written, listed or not: the next one is always above it.
        on_disk = [int(m.group(1)) for p in self.root.iterdir() if (m := _FILE.fullmatch(p.name))]
        self._last_version = max([0, *on_disk, *(p.version for p in self._policies)])
        self._write_lock = threading.Lock()  # publish runs in worker threads
        self._changed = asyncio.Condition()  # notified on each publish and on close
        self._closed = False

    # -- publishing -------------------------------------------------------------------------

    async def publish(self, name: str, onnx_bytes: bytes) -> PolicyInfo:
        """Check `onnx_bytes` against the contract, store it as the next version, wake watchers.

        Raises PolicyTooLarge or PolicyRejected (a ValueError) naming what is wrong.
        """
        # Checking and fsyncing up to max_bytes takes a while: keep it off the event loop.
        info = await asyncio.to_thread(self._publish, name, onnx_bytes)
        async with self._changed:
            self._changed.notify_all()
        return info

    def _publish(self, name: str, onnx_bytes: bytes) -> PolicyInfo:
        check_policy(name, onnx_bytes, self.max_bytes, self.edge_shape)
        with self._write_lock:
            info = PolicyInfo(
                version=self._last_version + 1,
                sha256=hashlib.sha256(onnx_bytes).hexdigest(),
                name=name,
                created_unix=time.time(),
                size_bytes=len(onnx_bytes),
            )
            _write_atomic(self._file(info.version), onnx_bytes)
            self._last_version = info.version
            policies = [*self._policies, info]
            index = {"policies": [dataclasses.asdict(p) for p in policies]}
            _write_atomic(self._index_path, json.dumps(index, indent=1).encode())
            self._policies = policies
        return info

    # -- reading ----------------------------------------------------------------------------

    def latest(self) -> PolicyInfo | None:
        return self._policies[-1] if self._policies else None

    def info(self, version: int = 0) -> PolicyInfo:
        """The policy `version` (0: the latest); PolicyNotFound when there is none."""
        latest = self.latest()
        if latest is None:
            raise PolicyNotFound("no policy has been published yet")
        if version == 0:
            return latest
        for info in self._policies:
            if info.version == version:
                return info
        raise PolicyNotFound(
            f"policy version {version} does not exist (latest is {latest.version})"
        )

    def get(self, version: int = 0) -> tuple[PolicyInfo, bytes]:
        """The policy `version` (0: the latest) and its ONNX bytes, checked against its sha256."""
        info = self.info(version)
        try:
            data = self._file(info.version).read_bytes()
        except OSError as exc:
            raise PolicyCorrupted(f"policy v{info.version} cannot be read: {exc}") from exc
        if hashlib.sha256(data).hexdigest() != info.sha256:
            # Never hand an edge a policy that is not the one that was checked and published.
            raise PolicyCorrupted(f"policy v{info.version} ({self._file(info.version).name}) "
                                  "does not match its sha256 in the index: the file changed")
        return info, data

    def policies(self) -> list[PolicyInfo]:
        """Every published policy, oldest first."""
        return list(self._policies)

    # -- watching ---------------------------------------------------------------------------

    async def wait_newer(self, after_version: int) -> PolicyInfo | None:
        """The first policy with a version above `after_version`, waiting until one is
        published; None once the registry is closed."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._closed or self._next(after_version))
            return None if self._closed else self._next(after_version)

    async def close(self) -> None:
        """End every wait_newer (the daemon is stopping). get() keeps working meanwhile, for
        RPCs still draining."""
        async with self._changed:
            self._closed = True
            self._changed.notify_all()

    # -- internals --------------------------------------------------------------------------

    def _next(self, after_version: int) -> PolicyInfo | None:
        return next((p for p in self._policies if p.version > after_version), None)

    def _file(self, version: int) -> Path:
        return self.root / f"v{version:06d}.onnx"

    def _load_index(self) -> list[PolicyInfo]:
        if not self._index_path.exists():
            return []
        try:
            raw = json.loads(self._index_path.read_text())
            policies = [PolicyInfo(**entry) for entry in raw["policies"]]
        except (ValueError, KeyError, TypeError) as exc:
            # Refuse to start rather than silently forget published versions.
            raise RuntimeError(f"{self._index_path} is not a valid policy index: {exc}") from exc
        return sorted(policies, key=lambda p: p.version)


def check_policy(name: str, onnx_bytes: bytes, max_bytes: int,
                 edge_shape: tuple[int, int] = (5, 384)) -> None:
    """Raise PolicyRejected (PolicyTooLarge for size) unless the policy may be published: the
    contract below, no external data, and then exactly what an edge does before it runs one
    (velo.core.policy.OnnxPolicy: onnxruntime loads it and runs masked probe states)."""
    if not _NAME.fullmatch(name):
        raise PolicyRejected(
            f"policy name {clip(name)} must be 1-128 characters of letters, digits, '_.:+-'"
        )
    if not onnx_bytes:
        raise PolicyRejected("policy is empty (no ONNX bytes)")
    if len(onnx_bytes) > max_bytes:
        raise PolicyTooLarge(f"policy is {len(onnx_bytes)} bytes; the limit is {max_bytes}")
    try:
        model = onnx.load_from_string(onnx_bytes)
    except Exception as exc:  # protobuf DecodeError and friends
        raise PolicyRejected(f"not a valid ONNX model: {exc}") from exc
    # Before the checker, which would look for the named files on this machine.
    external = [t.name for t in external_data_helper._get_all_tensors(model)
                if external_data_helper.uses_external_data(t)]
    if external:
        raise PolicyRejected(f"policy keeps weights outside the file (external data: "
                             f"{', '.join(external[:3])}); edges load only self-contained "
                             "policies: save it with all tensors inside")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # ValidationError and friends
        raise PolicyRejected(f"not a valid ONNX model: {exc}") from exc
    initializers = {init.name for init in model.graph.initializer}
    # Old exporters list weights as graph inputs too; they are not inputs a caller feeds.
    inputs = {v.name: v for v in model.graph.input if v.name not in initializers}
    outputs = {v.name: v for v in model.graph.output}
    wanted = {**_INPUTS, **(_LOAD_INPUT if "load" in inputs else {})}
    if set(inputs) != set(wanted):
        raise PolicyRejected(
            f"policy inputs are {sorted(inputs)}; the contract needs exactly "
            f"{sorted(_INPUTS)}, and `load` for a load-aware policy"
        )
    if "probs" not in outputs:
        raise PolicyRejected(f"policy outputs are {sorted(outputs)}; the contract needs 'probs'")
    for kind, expected, actual in (("input", wanted, inputs), ("output", _OUTPUTS, outputs)):
        for tensor, (shape, sizes) in expected.items():
            _check_tensor(kind, actual[tensor], shape, sizes)
    top_p, embed_dim = edge_shape
    try:
        OnnxPolicy(onnx_bytes, 0, name, top_p=top_p, embed_dim=embed_dim, sample=False)
    except PolicyRejected as exc:
        raise PolicyRejected(f"an edge would refuse this policy: {exc}") from exc


def _check_tensor(kind: str, value: onnx.ValueInfoProto, shape: str, sizes: dict[int, int]) -> None:
    rank = shape.count(",") + 1
    tensor = value.type.tensor_type
    if not value.type.HasField("tensor_type") or tensor.elem_type != onnx.TensorProto.FLOAT:
        raise PolicyRejected(f"policy {kind} '{value.name}' must be a float32 tensor {shape}")
    if not tensor.HasField("shape") or len(tensor.shape.dim) != rank:
        got = len(tensor.shape.dim) if tensor.HasField("shape") else "unknown"
        raise PolicyRejected(
            f"policy {kind} '{value.name}' has rank {got}; the contract needs {rank} {shape}"
        )
    for axis, size in sizes.items():
        dim = tensor.shape.dim[axis]
        # A symbolic or unknown size may still be right; a fixed wrong one never is.
        if dim.HasField("dim_value") and dim.dim_value != size:
            raise PolicyRejected(
                f"policy {kind} '{value.name}' has size {dim.dim_value} on axis {axis}; "
                f"the contract needs {size} {shape}"
            )


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
