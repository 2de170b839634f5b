"""The enrolment gallery: reference embeddings per identity, tied to one model bundle.

Biometric data (GDPR Art. 9): the file is written with mode 0600, identities and embeddings
never go to logs (only counts do), and a gallery enrolled with another bundle is refused, since
embeddings from two models are not comparable.

Scoring. Embeddings are unit length; an identity's template is the re-normalised mean of its
enrolled embeddings. The score is the **Euclidean distance** between the probe and the
template (0 = identical, 2 = opposite; on unit vectors it ranks like cosine). A match is
accepted when `distance <= threshold`, the same convention as `Bundle.threshold()` and
`edge.evaluation`.

Decisions:
- 1:1 (`match_1to1`, the frame claims an identity): `accept` or `reject`; `unknown` when the
  claimed identity is not enrolled.
- 1:N (`match_1toN`): `accept` with the closest identity when it is within the threshold,
  otherwise `unknown` with no identity (the nearest non-matching name is not disclosed).

File format (`.npz`, loaded with `allow_pickle=False`): `embeddings` float32 [M, D], `labels`
int32 [M] (index into the identity list) and `meta`, a JSON string: format version, bundle
sha256, embedding dim, precision, identities, per-identity enrolment counts, created time.
Not encrypted at rest (see docs/operations.md, privacy): protect it with file permissions and
disk encryption.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import stat
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scanner_io.errors import ConfigError, DataError, ThzEdgeError

log = logging.getLogger("thzedge.gallery")

GALLERY_FORMAT = 1
MAX_IDENTITY_LEN = 128
DECISIONS = ("accept", "reject", "unknown")


@dataclass(frozen=True)
class Match:
    """One verification outcome: who, how close, what was decided and with which threshold."""

    identity: str | None
    score: float | None  # Euclidean distance to the template (lower = more similar)
    decision: str  # accept | reject | unknown
    threshold: float
    mode: str  # "1:1" | "1:N"

    def __repr__(self) -> str:  # identities are personal data: keep them out of accidental logs
        return f"Match(mode={self.mode}, decision={self.decision}, identity=<redacted>)"

    def to_dict(self) -> dict[str, Any]:
        """Return the result-header form: mode, identity, score, decision, threshold."""
        return {
            "mode": self.mode,
            "identity": self.identity,
            "score": self.score,
            "decision": self.decision,
            "threshold": self.threshold,
        }


class Gallery:
    """Enrolled identities and their templates for one bundle; thread-safe to read."""

    def __init__(
        self,
        bundle_sha256: str,
        embedding_dim: int,
        threshold: float | None = None,
        precision: str = "fp32",
    ) -> None:
        self.bundle_sha256 = bundle_sha256
        self.embedding_dim = int(embedding_dim)
        self.threshold = threshold
        self.precision = precision
        self.created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self._refs: dict[str, np.ndarray] = {}  # identity -> [k, D] unit embeddings
        self._lock = threading.Lock()
        self._names: list[str] = []
        self._templates = np.zeros((0, self.embedding_dim), np.float32)

    # -- building -------------------------------------------------------------------------------

    @classmethod
    def for_bundle(cls, bundle: Any, threshold: float | None = None, precision: str = "fp32") -> Gallery:
        """Return an empty gallery for a `Bundle` (threshold defaults to the bundle's)."""
        if threshold is None:
            threshold = bundle.threshold(precision)
        return cls(bundle.sha256, bundle.embedding_dim, threshold, precision)

    def enroll(self, identity: str, embeddings: np.ndarray, replace: bool = False) -> int:
        """Add reference embeddings [k, D] for `identity` (or replace them); return its count."""
        _check_identity(identity)
        e = _unit_rows(embeddings, self.embedding_dim, "enrolment embeddings")
        with self._lock:
            old = self._refs.get(identity)
            self._refs[identity] = e if old is None or replace else np.concatenate([old, e])
            self._rebuild()
            return int(self._refs[identity].shape[0])

    def remove(self, identity: str) -> bool:
        """Delete an identity and all its references; return whether it was enrolled."""
        with self._lock:
            found = self._refs.pop(identity, None) is not None
            self._rebuild()
        return found

    def _rebuild(self) -> None:
        names = sorted(self._refs)
        templates = np.zeros((len(names), self.embedding_dim), np.float32)
        for i, name in enumerate(names):
            mean = self._refs[name].mean(axis=0)
            templates[i] = mean / max(float(np.linalg.norm(mean)), 1e-12)
        # Swap both at once so a reader never sees names and templates out of step.
        self._names, self._templates = names, templates

    # -- reading --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, identity: object) -> bool:
        return identity in self._refs

    @property
    def identities(self) -> tuple[str, ...]:
        """Enrolled identity names (sorted). Personal data: do not log them."""
        return tuple(self._names)

    def reference_count(self, identity: str) -> int:
        """How many embeddings were enrolled for `identity` (0 if none)."""
        refs = self._refs.get(identity)
        return 0 if refs is None else int(refs.shape[0])

    def __repr__(self) -> str:
        return (
            f"Gallery(identities={len(self)}, bundle={self.bundle_sha256[:12]}, threshold={self.threshold})"
        )

    # -- matching -------------------------------------------------------------------------------

    def _threshold(self) -> float:
        if self.threshold is None:
            raise ConfigError(
                "no verification threshold: the bundle has none for this precision; "
                "set [verification] threshold (Euclidean distance, e.g. from `thzedge eval`)"
            )
        return float(self.threshold)

    def distances(self, embedding: np.ndarray) -> np.ndarray:
        """Return the distance from one probe embedding [D] to every template, in `identities` order."""
        probe = _unit_rows(np.asarray(embedding).reshape(1, -1), self.embedding_dim, "probe embedding")[0]
        templates = self._templates
        if templates.shape[0] == 0:
            return np.zeros(0, np.float32)
        return np.linalg.norm(templates - probe[None, :], axis=1)

    def match_1to1(self, embedding: np.ndarray, identity: str) -> Match:
        """Verify a claimed identity: accept when the distance to its template <= threshold."""
        t = self._threshold()
        names, templates = self._names, self._templates
        try:
            i = names.index(identity)
        except ValueError:
            return Match(identity=identity, score=None, decision="unknown", threshold=t, mode="1:1")
        probe = _unit_rows(np.asarray(embedding).reshape(1, -1), self.embedding_dim, "probe embedding")[0]
        d = float(np.linalg.norm(templates[i] - probe))
        return Match(identity, d, "accept" if d <= t else "reject", t, "1:1")

    def match_1toN(self, embedding: np.ndarray) -> Match:  # noqa: N802 - the contract's name
        """Identify: the closest enrolled identity if within the threshold, else `unknown`."""
        t = self._threshold()
        d = self.distances(embedding)
        if d.size == 0:
            return Match(None, None, "unknown", t, "1:N")
        best = int(np.argmin(d))
        score = float(d[best])
        if score <= t:
            return Match(self._names[best], score, "accept", t, "1:N")
        return Match(None, score, "unknown", t, "1:N")

    # -- files ----------------------------------------------------------------------------------

    def save(self, path: Path) -> Path:
        """Write the gallery atomically with mode 0600 (temp file in the same dir, then rename)."""
        path = Path(path)
        if path.suffix != ".npz":
            raise ConfigError(f"gallery file {path}: use the .npz extension")
        with self._lock:
            names = sorted(self._refs)
            rows = [self._refs[n] for n in names]
            emb = np.concatenate(rows) if rows else np.zeros((0, self.embedding_dim), np.float32)
            labels = (
                np.concatenate([np.full(r.shape[0], i, np.int32) for i, r in enumerate(rows)])
                if rows
                else np.zeros(0, np.int32)
            )
        meta = {
            "format": GALLERY_FORMAT,
            "kind": "thzedge-gallery",
            "bundle_sha256": self.bundle_sha256,
            "embedding_dim": self.embedding_dim,
            "precision": self.precision,
            "score": "euclidean distance to the normalised mean template; accept if <= threshold",
            "identities": names,
            "created": self.created,
            "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask: owner only
            with os.fdopen(fd, "wb") as f:
                np.savez(f, embeddings=emb.astype(np.float32), labels=labels, meta=np.array(json.dumps(meta)))
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, path)
        log.info("gallery written: %d identities, %d references", len(names), int(emb.shape[0]))
        return path

    @classmethod
    def load(
        cls,
        path: Path,
        bundle: Any | None = None,
        threshold: float | None = None,
        precision: str = "fp32",
        require_threshold: bool = True,
    ) -> Gallery:
        """Read a gallery; refuse it when `bundle` (a Bundle) is not the one it was enrolled with.

        The threshold is `threshold` if given, else the bundle's for `precision`; with a bundle
        and no threshold at all, loading fails (ConfigError) unless `require_threshold` is False,
        so a daemon never starts with verification it cannot decide.
        """
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"gallery {path} does not exist; enrol with `thzedge enroll --gallery {path} ...`"
            )
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            log.warning("gallery %s is accessible to group/others (mode %o); run chmod 600 on it", path, mode)
        try:
            with np.load(path, allow_pickle=False) as z:
                emb = np.asarray(z["embeddings"], dtype=np.float32)
                labels = np.asarray(z["labels"])
                meta = json.loads(str(z["meta"]))
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
            raise DataError(f"{path} is not a thzedge gallery ({type(exc).__name__}: {exc})") from None
        if meta.get("kind") != "thzedge-gallery" or meta.get("format") != GALLERY_FORMAT:
            raise DataError(f"{path}: not a thzedge gallery of format {GALLERY_FORMAT}")
        dim = int(meta["embedding_dim"])
        names = list(meta["identities"])
        if emb.ndim != 2 or emb.shape[1] != dim or labels.shape != (emb.shape[0],):
            raise DataError(f"{path}: embeddings/labels shapes do not match the header; re-enrol")
        if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
            raise DataError(f"{path}: labels point outside the identity list; re-enrol")
        if bundle is not None:
            if meta["bundle_sha256"] != bundle.sha256:
                raise ConfigError(
                    f"gallery {path} was enrolled with model bundle {meta['bundle_sha256'][:12]}, but the "
                    f"daemon runs bundle {bundle.sha256[:12]}: embeddings of different models do not "
                    "compare; re-enrol with `thzedge enroll --model <this bundle>`"
                )
            if threshold is None:
                threshold = bundle.threshold(precision)
            if threshold is None and require_threshold:
                raise ConfigError(
                    f"bundle {bundle.sha256[:12]} has no verification threshold for {precision}: set "
                    "[verification] threshold (Euclidean distance, e.g. the EER one from `thzedge eval`)"
                )
        g = cls(meta["bundle_sha256"], dim, threshold, meta.get("precision", precision))
        g.created = meta.get("created", g.created)
        for i, name in enumerate(names):
            rows = emb[labels == i]
            if rows.shape[0]:
                g._refs[name] = _unit_rows(rows, dim, f"{path} references")
        g._rebuild()
        if bundle is not None and g.precision != precision:
            log.info(
                "gallery enrolled at %s, daemon runs %s (embeddings stay comparable)", g.precision, precision
            )
        log.info("gallery loaded: %d identities (bundle %s)", len(g), g.bundle_sha256[:12])
        return g


def enroll_from_inputs(
    gallery_path: Path,
    bundle_path: Path,
    identity: str,
    inputs: Sequence[Path],
    backend: str = "auto",
    precision: str = "fp32",
    replace: bool = False,
) -> tuple[Gallery, int]:
    """Encode conditioned crops (PNG / .npy, as `thzedge infer` reads) and enrol them.

    Creates the gallery file when it does not exist. Returns the gallery and the number of
    embeddings added.
    """
    from edge.bundle import Bundle
    from edge.infer import load_inputs

    bundle = Bundle.open(bundle_path)
    batch = load_inputs(inputs)
    return _encode_and_enroll(gallery_path, bundle, identity, batch.x, backend, precision, replace)


def enroll_from_source(
    gallery_path: Path,
    bundle_path: Path,
    identity: str,
    source_uri: str,
    frames: int,
    calibration: Path | None = None,
    conditioning: Any | None = None,
    backend: str = "auto",
    precision: str = "fp32",
    replace: bool = False,
    timeout_s: float = 10.0,
) -> tuple[Gallery, int]:
    """Capture `frames` raw frames from a source, calibrate and condition them exactly as the
    daemon does (`calibrate_and_condition` with the scanner's profile), and enrol them."""
    from calibration.conditioning import ConditioningParams, calibrate_and_condition
    from calibration.profile import CalibrationProfile, profile_carried_by
    from edge.bundle import Bundle
    from scanner_io.sources import open_source

    bundle = Bundle.open(bundle_path)
    profile = CalibrationProfile.load(calibration) if calibration is not None else None
    rows = []
    source = open_source(source_uri)
    try:
        if profile is None:  # as the daemon does: what the source carries, else identity
            carried = profile_carried_by(source)
            if carried is not None:
                profile, origin = carried
                log.info("no calibration profile given: using %s (profile %s)", origin, profile.profile_id)
            else:
                log.warning(
                    "no calibration profile given: enrolling uncorrected frames (identity calibration)"
                )
        params = profile.conditioning if profile is not None else ConditioningParams()
        if conditioning is not None:
            params = conditioning.apply(params)
        import time

        deadline = time.monotonic() + timeout_s
        while len(rows) < frames:
            if time.monotonic() > deadline:
                raise ThzEdgeError(f"{source_uri}: got {len(rows)} of {frames} frames within {timeout_s:g} s")
            item = source.read(0.5)
            if item is None:
                if getattr(source, "exhausted", False):
                    raise ThzEdgeError(f"{source_uri} ended after {len(rows)} of {frames} frames")
                continue
            data = getattr(item, "data", None)
            if data is None:  # a MalformedFrame: skip it, as the daemon would
                log.warning("skipped a malformed frame: %s", getattr(item, "reason", "?"))
                continue
            rows.append(calibrate_and_condition(data, profile, params))
    finally:
        source.close()
    x = np.stack(rows).astype(np.float32)[:, None]
    return _encode_and_enroll(gallery_path, bundle, identity, x, backend, precision, replace)


def _encode_and_enroll(
    gallery_path: Path,
    bundle: Any,
    identity: str,
    x: np.ndarray,
    backend: str,
    precision: str,
    replace: bool,
) -> tuple[Gallery, int]:
    """Open the gallery (or start one for `bundle`), enrol the embeddings of `x`, save it."""
    from edge.runner import Runner

    gallery = (
        Gallery.load(gallery_path, bundle, precision=precision, require_threshold=False)
        if Path(gallery_path).exists()
        else Gallery.for_bundle(bundle, precision=precision)
    )
    _check_identity(identity)
    runner = Runner.from_bundle(bundle, backend=backend, precision=precision)
    try:
        step = max(1, int(runner.max_batch))
        embs = [
            np.asarray(runner.encode(x[i : i + step]).embedding, np.float32) for i in range(0, len(x), step)
        ]
    finally:
        runner.close()
    gallery.enroll(identity, np.concatenate(embs), replace=replace)
    gallery.save(gallery_path)
    return gallery, int(x.shape[0])


def _check_identity(identity: str) -> None:
    if not isinstance(identity, str) or not identity.strip():
        raise ThzEdgeError("identity must be a non-empty name")
    if len(identity) > MAX_IDENTITY_LEN or not identity.isprintable():
        raise ThzEdgeError(f"identity must be printable and at most {MAX_IDENTITY_LEN} characters")


def _unit_rows(e: np.ndarray, dim: int, what: str) -> np.ndarray:
    e = np.asarray(e, dtype=np.float32)
    if e.ndim == 1:
        e = e[None, :]
    if e.ndim != 2 or e.shape[1] != dim:
        raise DataError(f"{what}: expected [k, {dim}] embeddings, got shape {tuple(e.shape)}")
    if e.shape[0] == 0:
        raise DataError(f"{what}: no embeddings")
    if not np.all(np.isfinite(e)):
        raise DataError(f"{what}: contains NaN or inf")
    norms = np.linalg.norm(e, axis=1, keepdims=True)
    if np.any(norms < 1e-12):
        raise DataError(f"{what}: a zero embedding cannot be normalised")
    return e / norms
