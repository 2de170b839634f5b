"""The model bundle: a directory of ONNX graphs described and checksummed by `manifest.json`.

A bundle holds one encoder graph (thz -> embedding, posture_logits, feat1..feat4) and one
decoder graph per posture (feat1..feat4 -> reconstruction), per precision variant ("fp32"
always; "fp16"/"int8" when quantization added them). `Bundle.open` refuses a bundle whose
format version it does not know, whose manifest is incomplete, or whose files fail their
sha256, so the runtime never executes a graph nobody vouched for. The bundle id is the sha256
of `manifest.json`; since the manifest holds every file's sha256, it pins the whole bundle.

Schema (format version 1) is documented in docs/bundle.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any

from scanner_io.choices import Choice
from scanner_io.errors import BundleError
from scanner_io.frame import POSTURES

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "thzedge-bundle"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS: tuple[int, ...] = (1,)
MODEL_FAMILY = "thz-mtl"
INPUT_NAME = "thz"
INPUT_SIZE = 64
ENCODER_GRAPH = "encoder"
ENCODER_OUTPUTS: tuple[str, ...] = ("embedding", "posture_logits", "feat1", "feat2", "feat3", "feat4")
DECODER_INPUTS: tuple[str, ...] = ("feat1", "feat2", "feat3", "feat4")
DECODER_OUTPUT = "reconstruction"


class Precision(Choice):
    """A bundle's numeric precision variant: fp32 always; fp16/int8 when quantization added them."""

    fp32 = "fp32"
    fp16 = "fp16"
    int8 = "int8"


_HASH_CHUNK = 1 << 20

_FIX = "re-export it with `thzedge export onnx` or restore it from where it came from"


def decoder_graph_name(posture: int) -> str:
    """Name of the decoder graph of a posture class index (used by backends and the manifest)."""
    return f"decoder_{posture}"


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def demo_bundle_path() -> Path:
    """Return the directory of the demo bundle shipped inside the package (edge/demo_bundle)."""
    path = Path(__file__).resolve().parent / "demo_bundle"
    if not (path / MANIFEST_NAME).is_file():
        raise BundleError(
            f"the demo bundle is not installed ({path / MANIFEST_NAME} is missing); "
            "reinstall thzedge or pass --model with a bundle made by `thzedge export onnx`"
        )
    return path


# The name `--model demo` gives the shipped demo bundle (a directory really called demo is ./demo).
DEMO_MODEL = "demo"


def model_path(value: str | Path) -> Path:
    """Resolve a `--model` value: the name `demo` is the shipped demo bundle, anything else a directory."""
    if isinstance(value, str) and value == DEMO_MODEL:
        return demo_bundle_path()
    return Path(value)


def writable_model_path(value: str | Path, command: str) -> Path:
    """Resolve a bundle a command writes into; the shipped demo bundle is refused (copy it first)."""
    if isinstance(value, str) and value == DEMO_MODEL:
        raise BundleError(
            f"`{command}` writes into the bundle, and `demo` is the shipped demo model, which stays as "
            f"shipped: copy it first (cp -r {demo_bundle_path()} my_bundle) and pass that copy"
        )
    return Path(value)


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape (a str marks a dynamic dimension, e.g. "N") and dtype of one graph tensor."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        """JSON form used in the manifest."""
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorSpec:
        """Parse the manifest form; raises KeyError/TypeError on a malformed entry."""
        shape = tuple(s if isinstance(s, str) else int(s) for s in d["shape"])
        return cls(name=str(d["name"]), shape=shape, dtype=str(d["dtype"]))


@dataclass(frozen=True)
class GraphSpec:
    """Inputs and outputs of one graph of the bundle."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON form used in the manifest."""
        return {"inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GraphSpec:
        """Parse the manifest form."""
        return cls(
            inputs=tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
        )


def graph_specs(
    embedding_dim: int, num_postures: int, channels: tuple[int, int, int, int]
) -> dict[str, GraphSpec]:
    """The I/O contract of every graph for a network of these sizes (batch axis named "N")."""
    c1, c2, c3, c4 = channels
    feats = (
        TensorSpec("feat1", ("N", c1, 32, 32)),
        TensorSpec("feat2", ("N", c2, 16, 16)),
        TensorSpec("feat3", ("N", c3, 8, 8)),
        TensorSpec("feat4", ("N", c4, 4, 4)),
    )
    specs = {
        ENCODER_GRAPH: GraphSpec(
            inputs=(TensorSpec(INPUT_NAME, ("N", 1, INPUT_SIZE, INPUT_SIZE)),),
            outputs=(
                TensorSpec("embedding", ("N", embedding_dim)),
                TensorSpec("posture_logits", ("N", num_postures)),
                *feats,
            ),
        )
    }
    decoder = GraphSpec(inputs=feats, outputs=(TensorSpec(DECODER_OUTPUT, ("N", 1, INPUT_SIZE, INPUT_SIZE)),))
    for k in range(num_postures):
        specs[decoder_graph_name(k)] = decoder
    return specs


def save_manifest(bundle_dir: Path, manifest: Mapping[str, Any]) -> Path:
    """Write manifest.json atomically (temp file + rename), so a crash never leaves half a manifest."""
    bundle_dir = Path(bundle_dir)
    text = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", dir=bundle_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, bundle_dir / MANIFEST_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return bundle_dir / MANIFEST_NAME


def file_entry(bundle_dir: Path, name: str) -> dict[str, Any]:
    """The manifest `files` entry of one file in the bundle: sha256 and size."""
    path = Path(bundle_dir) / name
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def _check_relative(name: str, where: str) -> None:
    p = PurePosixPath(name)
    if not name or p.is_absolute() or ".." in p.parts or "\\" in name:
        raise BundleError(f"manifest {where} names {name!r}, not a plain path inside the bundle; {_FIX}")


def _require(d: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(d, Mapping) or key not in d:
        raise BundleError(f"manifest is incomplete: {where}{key} is missing; {_FIX}")
    value = d[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise BundleError(f"manifest field {where}{key} has the wrong type ({type(value).__name__}); {_FIX}")
    return value


class Bundle:
    """A verified model bundle directory; construct it with `Bundle.open`."""

    def __init__(self, path: Path, manifest: dict[str, Any], manifest_sha256: str) -> None:
        self.path = path
        self._manifest = manifest
        self.sha256 = manifest_sha256
        model = manifest["model"]
        self.embedding_dim: int = int(model["embedding_dim"])
        self.postures: tuple[str, ...] = tuple(model["postures"])
        self.max_batch: int = int(manifest["max_batch"])
        self.graphs: dict[str, GraphSpec] = {
            name: GraphSpec.from_dict(spec) for name, spec in manifest["graphs"].items()
        }

    @classmethod
    def open(cls, path: Path | str) -> Bundle:
        """Open a bundle: check its format version, schema and every file's sha256."""
        path = Path(path)
        manifest_path = path / MANIFEST_NAME
        if not path.is_dir():
            raise BundleError(f"no model bundle at {path} (not a directory); use `thzedge export onnx`")
        if not manifest_path.is_file():
            raise BundleError(
                f"{path} is not a thzedge bundle ({MANIFEST_NAME} is missing); "
                "export one with `thzedge export onnx`"
            )
        raw = manifest_path.read_bytes()
        try:
            manifest = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{manifest_path} is not valid JSON ({exc}); {_FIX}") from None
        if not isinstance(manifest, dict):
            raise BundleError(f"{manifest_path} is not a JSON object; {_FIX}")
        _validate(manifest)
        _verify_files(path, manifest)
        return cls(path.resolve(), manifest, hashlib.sha256(raw).hexdigest())

    @property
    def manifest(self) -> Mapping[str, Any]:
        """The parsed manifest.json (read-only view)."""
        return MappingProxyType(self._manifest)

    @property
    def id(self) -> str:
        """Short bundle id (first 12 hex digits of the manifest sha256) for logs and results."""
        return self.sha256[:12]

    @property
    def num_postures(self) -> int:
        return len(self.postures)

    @property
    def precisions(self) -> tuple[str, ...]:
        """Precision variants the bundle holds ONNX graphs for, e.g. ("fp32", "int8")."""
        return tuple(self._manifest["variants"])

    @property
    def input_spec(self) -> TensorSpec:
        """The model input contract: thz [N,1,64,64] float32 in [0,1]."""
        return self.graphs[ENCODER_GRAPH].inputs[0]

    def gate_passed_precisions(self) -> tuple[str, ...]:
        """The variants fit to run: fp32 (the reference) and those whose accuracy gate passed."""
        out = []
        for precision in self.precisions:
            gate = self.variant(precision).get("gate")
            if precision == Precision.fp32 or (isinstance(gate, Mapping) and gate.get("passed") is True):
                out.append(precision)
        return tuple(out)

    def variant(self, precision: str = "fp32") -> Mapping[str, Any]:
        """The manifest entry of one precision variant; BundleError if the bundle lacks it."""
        variants = self._manifest["variants"]
        if precision not in variants:
            have = ", ".join(variants) or "none"
            raise BundleError(
                f"bundle {self.path} has no '{precision}' variant (it has: {have}); "
                f"choose one of those or add it with `thzedge export quantize`"
            )
        return MappingProxyType(variants[precision])

    def graph_file(self, graph: str, precision: str = "fp32") -> Path:
        """Path of one graph's ONNX file (graph = "encoder" or "decoder_<k>")."""
        files = self.variant(precision)["graphs"]
        if graph not in files:
            raise BundleError(f"bundle {self.path} has no graph {graph!r} in its {precision} variant; {_FIX}")
        return self.path / files[graph]

    def encoder_file(self, precision: str = "fp32") -> Path:
        """Path of the encoder ONNX of a precision variant."""
        return self.graph_file(ENCODER_GRAPH, precision)

    def posture_index(self, posture: int | str) -> int:
        """Class index of a posture given as index or name (case-insensitive)."""
        if isinstance(posture, str):
            names = [p.lower() for p in self.postures]
            if posture.lower() not in names:
                raise BundleError(f"unknown posture {posture!r}; this bundle has {', '.join(self.postures)}")
            return names.index(posture.lower())
        k = int(posture)
        if not 0 <= k < self.num_postures:
            raise BundleError(f"posture index {k} out of range 0..{self.num_postures - 1}")
        return k

    def decoder_file(self, posture: int | str, precision: str = "fp32") -> Path:
        """Path of the decoder ONNX of one posture (class index or name)."""
        return self.graph_file(decoder_graph_name(self.posture_index(posture)), precision)

    def read_verified(self, name: str) -> bytes:
        """Read a file listed in the manifest and check its sha256 again (it may have changed since open)."""
        entry = self._manifest["files"].get(name)
        if entry is None:
            raise BundleError(f"{name} is not listed in the manifest of {self.path}; {_FIX}")
        data = (self.path / name).read_bytes()
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise BundleError(f"bundle file {name} in {self.path} changed after it was opened; {_FIX}")
        return data

    def graph_bytes(self, graph: str, precision: str = "fp32") -> bytes:
        """The verified ONNX bytes of one graph of a precision variant."""
        self.graph_file(graph, precision)  # raises a clear BundleError for an unknown graph
        return self.read_verified(self.variant(precision)["graphs"][graph])

    @property
    def encoder_sha256(self) -> str:
        """sha256 of the fp32 encoder graph: what makes this bundle's embeddings (galleries bind to it).

        Quantized variants are derived from this encoder, and `export threshold` / `export
        quantize` rewrite only the manifest, so this stays put while the bundle id changes.
        """
        return str(self._manifest["files"][self.variant("fp32")["graphs"][ENCODER_GRAPH]]["sha256"])

    def accuracy_gate(self, precision: str) -> Mapping[str, Any] | None:
        """The accuracy-gate report of a variant against fp32 (None when it has none)."""
        gate = (self._manifest.get("accuracy_gates") or {}).get(precision)
        return None if gate is None else MappingProxyType(gate)

    def threshold(self, precision: str = "fp32") -> float | None:
        """Calibrated verification threshold (Euclidean distance) of a variant; None if not calibrated."""
        value = self.variant(precision).get("verification", {}).get("threshold")
        return None if value is None else float(value)

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r}, id={self.id}, precisions={self.precisions})"


def _validate(m: dict[str, Any]) -> None:
    fmt = m.get("format")
    if fmt != FORMAT_NAME:
        raise BundleError(f"manifest format is {fmt!r}, not {FORMAT_NAME!r}: not a thzedge bundle; {_FIX}")
    version = m.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        supported = ", ".join(map(str, SUPPORTED_FORMAT_VERSIONS))
        raise BundleError(
            f"bundle format version {version!r} is not supported by this thzedge (it reads {supported}); "
            "use the thzedge release that wrote it, or re-export the bundle with this one"
        )
    model = _require(m, "model", dict, "")
    _require(model, "family", str, "model.")
    _require(model, "variant", str, "model.")
    dim = _require(model, "embedding_dim", int, "model.")
    postures = _require(model, "postures", list, "model.")
    if not postures or not all(isinstance(p, str) for p in postures):
        raise BundleError(f"manifest model.postures must be a non-empty list of names; {_FIX}")
    if dim < 1:
        raise BundleError(f"manifest model.embedding_dim must be >= 1, got {dim}; {_FIX}")
    max_batch = _require(m, "max_batch", int, "")
    if max_batch < 1:
        raise BundleError(f"manifest max_batch must be >= 1, got {max_batch}; {_FIX}")
    _require(m, "input", dict, "")
    graphs = _require(m, "graphs", dict, "")
    expected = {ENCODER_GRAPH} | {decoder_graph_name(k) for k in range(len(postures))}
    if set(graphs) != expected:
        raise BundleError(
            f"manifest graphs are {sorted(graphs)}, expected {sorted(expected)} "
            f"for {len(postures)} postures; {_FIX}"
        )
    try:
        specs = {name: GraphSpec.from_dict(spec) for name, spec in graphs.items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"manifest graphs entry is malformed ({exc!r}); {_FIX}") from None
    enc = specs[ENCODER_GRAPH]
    if [t.name for t in enc.inputs] != [INPUT_NAME] or [t.name for t in enc.outputs] != list(ENCODER_OUTPUTS):
        raise BundleError(f"manifest encoder tensors do not match the thzedge contract; {_FIX}")
    if enc.outputs[0].shape[-1] != dim:
        raise BundleError(
            f"manifest encoder embedding size {enc.outputs[0].shape[-1]} != model.embedding_dim {dim}; {_FIX}"
        )
    files = _require(m, "files", dict, "")
    for name, entry in files.items():
        _check_relative(name, "files")
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise BundleError(f"manifest files[{name!r}] has no sha256; {_FIX}")
    variants = _require(m, "variants", dict, "")
    if "fp32" not in variants:
        raise BundleError(f"manifest has no fp32 variant; {_FIX}")
    for precision, variant in variants.items():
        vgraphs = _require(variant, "graphs", dict, f"variants.{precision}.")
        if set(vgraphs) != expected:
            raise BundleError(
                f"manifest variant {precision} lists graphs {sorted(vgraphs)}, "
                f"expected {sorted(expected)}; {_FIX}"
            )
        for graph, rel in vgraphs.items():
            if not isinstance(rel, str) or rel not in files:
                raise BundleError(
                    f"manifest variant {precision} graph {graph} names {rel!r}, which is not in files; {_FIX}"
                )


def _verify_files(path: Path, m: dict[str, Any]) -> None:
    for name, entry in m["files"].items():
        f = path / name
        if not f.is_file():
            raise BundleError(f"bundle {path} is incomplete: {name} is missing; {_FIX}")
        if "bytes" in entry and f.stat().st_size != entry["bytes"]:
            raise BundleError(
                f"bundle file {name} is {f.stat().st_size} bytes, the manifest says {entry['bytes']} "
                f"(truncated or tampered with); {_FIX}"
            )
        if sha256_file(f) != entry["sha256"]:
            raise BundleError(f"bundle file {name} fails its sha256 check (tampered or corrupted); {_FIX}")


def default_postures(num_postures: int) -> list[str]:
    """Posture names in class-index order: the research names when there are 5, else "posture<k>"."""
    if num_postures == len(POSTURES):
        return list(POSTURES)
    return [f"posture{k}" for k in range(num_postures)]
