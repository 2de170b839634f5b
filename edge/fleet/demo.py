"""Material to try fleet workflows on: simulated recordings, a gallery for them, a degraded bundle.

Used by the tests, `benchmarks/bench_rescore.py` and docs/fleet.md. Recordings come from one
simulator stream (so one gallery knows every identity in them), each carrying the simulator's
true calibration profile as a recorded scan does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from calibration.conditioning import calibrate_and_condition
from calibration.simulated import true_profile
from edge.bundle import Bundle, file_entry, save_manifest
from edge.gallery import Gallery
from edge.runner import Runner
from scanner_io.errors import MissingDependencyError
from scanner_io.frame import POSTURES
from scanner_io.recording import Recorder
from scanner_io.simulator import ScannerSimulator, identity_name


def demo_simulator(seed: int = 7, identities: int = 6) -> ScannerSimulator:
    """The simulator the demo recordings and gallery share: claimed identities, some impostors."""
    return ScannerSimulator(
        seed=seed, identities=identities, claim_identity=True, impostor_rate=0.3, start_time_ns=0
    )


def write_sim_recordings(
    out_dir: Path, recordings: int, frames: int, seed: int = 7, identities: int = 6
) -> list[Path]:
    """Write `recordings` MCAP files of `frames` simulated frames each (with the true profile)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sim = demo_simulator(seed, identities)
    profile = true_profile(sim)
    paths = []
    for k in range(recordings):
        path = out_dir / f"rec{k:03d}.mcap"
        with Recorder(path, calibration=profile, fsync=False) as rec:
            for _ in range(frames):
                rec.write(sim.next_frame())
        paths.append(path)
    return paths


def enroll_sim_gallery(
    bundle_path: Path,
    out: Path,
    precision: str = "fp32",
    seed: int = 7,
    identities: int = 6,
    samples: int = 2,
    threads: int = 1,
) -> Path:
    """Enrol every simulated identity (each posture, `samples` concealed captures) into a gallery."""
    sim = demo_simulator(seed, identities)
    profile = true_profile(sim)
    bundle = Bundle.open(bundle_path)
    gallery = Gallery.for_bundle(bundle, precision=precision)
    with Runner.from_bundle(bundle, backend="ort", precision=precision, threads=threads) as runner:
        for i in range(identities):
            caps = [
                sim.render(identity=i, posture=p, sample=s, concealed=True)
                for p in range(len(POSTURES))
                for s in range(samples)
            ]
            x = np.stack([calibrate_and_condition(c.data, profile) for c in caps])[:, None].astype(np.float32)
            out_i = runner.infer(x, reconstruct=False)
            gallery.enroll(identity_name(i), out_i.embedding, postures=out_i.posture)
    return gallery.save(out)


def perturbed_bundle(src: Path, out: Path, scale: float = 0.05, seed: int = 0) -> Path:
    """Copy a bundle with noise (`scale` × each tensor's std) added to its fp32 encoder weights.

    The copy is a valid bundle (new sha256s in its manifest): a stand-in for a model that got
    worse, for rescore demos and golden-replay tests. Needs `onnx` (the export extra).
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:
        raise MissingDependencyError("perturbed_bundle needs onnx: pip install 'thzedge[export]'") from exc
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out)
    bundle = Bundle.open(out)
    rel = bundle.variant("fp32")["graphs"]["encoder"]
    model = onnx.load(str(out / rel))
    rng = np.random.default_rng(seed)
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype != np.float32 or w.size < 16:
            continue
        noisy = w + rng.normal(0.0, scale * float(w.std() or 1.0), w.shape).astype(np.float32)
        init.CopyFrom(numpy_helper.from_array(noisy, init.name))
    onnx.save(model, str(out / rel))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"][rel] = file_entry(out, rel)
    save_manifest(out, manifest)
    Bundle.open(out)  # still a valid bundle
    return out
