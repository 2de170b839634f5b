"""The enrolment gallery: reference embeddings per identity, tied to one model bundle.

Biometric data (GDPR Art. 9): the file is written with mode 0600, identities and embeddings
never go to logs (only counts do), and a gallery enrolled with another bundle is refused, since
embeddings from two models are not comparable.

Scoring. Embeddings are unit length. Each enrolled reference keeps the posture the model
predicted for it (0..4, or -1 when unknown). The score of a probe against an identity is the
**Euclidean distance** to that identity's nearest reference **of the probe's predicted
posture**; when the identity has no reference of that posture (or the caller gives no posture),
to its nearest reference of any posture (0 = identical, 2 = opposite; on unit vectors it ranks
like cosine). A match is accepted when `distance <= threshold`, the same convention as
`Bundle.threshold()` and `edge.evaluation`.

Why not a mean template (format 1 did that): the model's embedding depends strongly on posture
and on the capture, and the bundle's threshold was chosen on pairs of one posture; a mean over
postures lies far from every probe. Measured with the demo bundle on unseen simulated people
(`benchmarks/gallery_operating_point.py`, docs/operations.md): genuine accept rate at the stored
threshold 0.04 with the mean template, 0.34 with the posture-matched reference (one enrolment
capture per posture), 0.60 with three per posture (12 people, drifting stream probes).

Decisions:
- 1:1 (`match_1to1`, the frame claims an identity): `accept` or `reject`; `unknown` when the
  claimed identity is not enrolled.
- 1:N (`match_1toN`): `accept` with the closest identity when it is within the threshold,
  otherwise `unknown` with no identity (the nearest non-matching name is not disclosed).

File format 2 (`.npz`, loaded with `allow_pickle=False`): `embeddings` float32 [M, D], `labels`
int32 [M] (index into the identity list), `postures` int8 [M] (predicted posture of each
reference, -1 unknown) and `meta`, a JSON string: format version, bundle sha256, embedding dim,
precision, identities, created time. A format-1 file (no postures) is read with every posture
unknown, so it matches by nearest reference until it is re-enrolled; it is written back as format 2.
With a device storage key (`thzedge keys generate --kind storage`, [storage] key_file or the
systemd credential) the `.npz` bytes are sealed with AES-256-GCM (`scanner_io.atrest`): a
tampered file or another key is refused, never decoded. Without a key the file is plaintext
(a warning says so); `[storage] require_encryption` makes that an error.
"""

from __future__ import annotations

import datetime
import io
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from calibration.conditioning import ConditioningParams, calibrate_and_condition
from calibration.profile import resolve_profile
from edge.bundle import Bundle
from edge.infer import load_inputs
from edge.runner import Runner
from scanner_io.atrest import find_storage_key, is_sealed, seal, unseal
from scanner_io.choices import Choice
from scanner_io.errors import ConfigError, DataError, ThzEdgeError
from scanner_io.frame import POSTURES
from scanner_io.npz import read_npz
from scanner_io.sources import MalformedFrame, open_source

log = logging.getLogger("thzedge.gallery")

GALLERY_FORMAT = 2
READABLE_FORMATS = (1, 2)
# What a sealed gallery file says it holds (scanner_io.atrest envelope).
GALLERY_SEAL_KIND = "thzedge-gallery"
UNKNOWN_POSTURE = -1
MAX_IDENTITY_LEN = 128
DECISIONS = ("accept", "reject", "unknown")


class VerificationMode(Choice):
    """How a probe is matched: auto (1:1 when the frame claims an identity, else 1:N), or fixed."""

    auto = "auto"
    one_to_one = "1:1"
    one_to_n = "1:N"
    off = "off"


# names, references [M, D] grouped by identity in name order, their postures [M], first rows
_View = tuple[list[str], np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Match:
    """One verification outcome: who, how close, what was decided and with which threshold."""

    identity: str | None
    score: float | None  # Euclidean distance to the matched reference (lower = more similar)
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
        self._ref_postures: dict[str, np.ndarray] = {}  # identity -> [k] int8 posture (-1 unknown)
        self._lock = threading.Lock()
        # Matching view, swapped in one assignment by _rebuild: names, all references [M, D]
        # grouped by identity in name order, their postures [M] and each identity's first row.
        self._view: _View = (
            [],
            np.zeros((0, self.embedding_dim), np.float32),
            np.zeros(0, np.int8),
            np.zeros(0, np.intp),
        )

    # -- building -------------------------------------------------------------------------------

    @classmethod
    def for_bundle(cls, bundle: Any, threshold: float | None = None, precision: str = "fp32") -> Gallery:
        """Return an empty gallery for a `Bundle` (threshold defaults to the bundle's)."""
        if threshold is None:
            threshold = bundle.threshold(precision)
        return cls(bundle.sha256, bundle.embedding_dim, threshold, precision)

    def enroll(
        self,
        identity: str,
        embeddings: np.ndarray,
        replace: bool = False,
        postures: np.ndarray | Sequence[int] | None = None,
    ) -> int:
        """Add reference embeddings [k, D] for `identity` (or replace them); return its count.

        `postures` [k]: the posture the model predicted for each reference (0..4; -1 or None:
        unknown). Matching prefers the references of the probe's posture.
        """
        _check_identity(identity)
        e = _unit_rows(embeddings, self.embedding_dim, "enrolment embeddings")
        p = _posture_rows(postures, e.shape[0], "enrolment postures")
        with self._lock:
            old = self._refs.get(identity)
            if old is None or replace:
                self._refs[identity], self._ref_postures[identity] = e, p
            else:
                self._refs[identity] = np.concatenate([old, e])
                self._ref_postures[identity] = np.concatenate([self._ref_postures[identity], p])
            self._rebuild()
            return int(self._refs[identity].shape[0])

    def remove(self, identity: str) -> bool:
        """Delete an identity and all its references; return whether it was enrolled."""
        with self._lock:
            found = self._refs.pop(identity, None) is not None
            self._ref_postures.pop(identity, None)
            self._rebuild()
        return found

    def _rebuild(self) -> None:
        names = sorted(self._refs)
        if names:
            refs = np.concatenate([self._refs[n] for n in names]).astype(np.float32)
            post = np.concatenate([self._ref_postures[n] for n in names]).astype(np.int8)
            counts = np.array([self._refs[n].shape[0] for n in names], np.intp)
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.intp)
        else:
            refs = np.zeros((0, self.embedding_dim), np.float32)
            post, starts = np.zeros(0, np.int8), np.zeros(0, np.intp)
        # One assignment, so a reader never sees names and references out of step.
        self._view = (names, refs, post, starts)

    # -- reading --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._view[0])

    def __contains__(self, identity: object) -> bool:
        return identity in self._refs

    @property
    def identities(self) -> tuple[str, ...]:
        """Enrolled identity names (sorted). Personal data: do not log them."""
        return tuple(self._view[0])

    def reference_count(self, identity: str) -> int:
        """How many embeddings were enrolled for `identity` (0 if none)."""
        refs = self._refs.get(identity)
        return 0 if refs is None else int(refs.shape[0])

    def enrolled_postures(self, identity: str) -> tuple[int, ...]:
        """The distinct postures (0..4; -1 unknown) of `identity`'s references, sorted."""
        p = self._ref_postures.get(identity)
        return () if p is None else tuple(int(v) for v in np.unique(p))

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

    def distances(self, embedding: np.ndarray, posture: int | None = None) -> np.ndarray:
        """Return the distance from one probe embedding [D] to every identity, in `identities` order.

        Per identity: the nearest reference of `posture` (the probe's predicted posture), or the
        nearest reference of any posture when it has none of that posture or `posture` is None.
        """
        return self._distances(self._view, embedding, posture)

    def _distances(self, view: _View, embedding: np.ndarray, posture: int | None) -> np.ndarray:
        probe = _unit_rows(np.asarray(embedding).reshape(1, -1), self.embedding_dim, "probe embedding")[0]
        _, refs, post, starts = view
        if refs.shape[0] == 0:
            return np.zeros(0, np.float32)
        d = np.linalg.norm(refs - probe[None, :], axis=1)
        nearest = np.minimum.reduceat(d, starts)
        if posture is None or int(posture) < 0:
            return nearest
        same = np.minimum.reduceat(np.where(post == int(posture), d, np.inf), starts)
        return np.where(np.isfinite(same), same, nearest)

    def match_1to1(self, embedding: np.ndarray, identity: str, posture: int | None = None) -> Match:
        """Verify a claimed identity: accept when the distance to its reference (of the probe's
        posture, else the nearest) is <= threshold."""
        t = self._threshold()
        view = self._view
        try:
            i = view[0].index(identity)
        except ValueError:
            return Match(identity=identity, score=None, decision="unknown", threshold=t, mode="1:1")
        d = float(self._distances(view, embedding, posture)[i])
        return Match(identity, d, "accept" if d <= t else "reject", t, "1:1")

    def match_1toN(self, embedding: np.ndarray, posture: int | None = None) -> Match:  # noqa: N802 - the contract's name
        """Identify: the closest enrolled identity if within the threshold, else `unknown`."""
        t = self._threshold()
        view = self._view
        d = self._distances(view, embedding, posture)
        if d.size == 0:
            return Match(None, None, "unknown", t, "1:N")
        best = int(np.argmin(d))
        score = float(d[best])
        if score <= t:
            return Match(view[0][best], score, "accept", t, "1:N")
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
            postures = (
                np.concatenate([self._ref_postures[n] for n in names]).astype(np.int8)
                if rows
                else np.zeros(0, np.int8)
            )
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
            "score": (
                "euclidean distance to the nearest reference of the probe's predicted posture "
                "(nearest of any posture if none); accept if <= threshold"
            ),
            "identities": names,
            "created": self.created,
            "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        buf = io.BytesIO()
        np.savez(
            buf,
            embeddings=emb.astype(np.float32),
            labels=labels,
            postures=postures,
            meta=np.array(json.dumps(meta)),
        )
        data = buf.getvalue()
        # Biometric references: sealed under the device storage key when there is one (R-SEC-7).
        key = find_storage_key()
        if key is not None:
            data = seal(data, key, GALLERY_SEAL_KIND)
        else:
            log.warning("gallery %s written WITHOUT encryption: no storage key configured", path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask: owner only
            with os.fdopen(fd, "wb") as f:
                f.write(data)
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
            raw = path.read_bytes()
        except OSError as exc:
            raise DataError(f"cannot read gallery {path}: {exc.strerror}") from None
        if is_sealed(raw):
            raw = unseal(raw, find_storage_key(), f"gallery {path}", GALLERY_SEAL_KIND)
        try:
            z = read_npz(path, ("embeddings", "labels", "meta"), ("postures",), data=raw)
        except DataError as exc:
            raise DataError(f"{exc}; not a thzedge gallery") from None
        try:
            return cls._from_arrays(path, z, bundle, threshold, precision, require_threshold)
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            # A malformed header (wrong JSON types, missing keys): the file, not thzedge, is wrong.
            raise DataError(
                f"{path}: malformed gallery metadata ({type(exc).__name__}: {exc}); re-enrol"[:300]
            ) from None

    @classmethod
    def _from_arrays(
        cls,
        path: Path,
        z: dict[str, np.ndarray],
        bundle: Any | None,
        threshold: float | None,
        precision: str,
        require_threshold: bool,
    ) -> Gallery:
        emb = np.asarray(z["embeddings"], dtype=np.float32)
        labels = z["labels"]
        try:
            meta = json.loads(str(z["meta"]))
        except (json.JSONDecodeError, RecursionError) as exc:
            raise DataError(f"{path}: gallery metadata is not JSON ({exc}); re-enrol") from None
        if not isinstance(meta, dict):
            raise DataError(f"{path}: gallery metadata is not a JSON object; re-enrol")
        postures = z.get("postures")
        if labels.dtype.kind not in "iu":
            raise DataError(f"{path}: labels must be integers (found {labels.dtype}); re-enrol")
        if meta.get("kind") != "thzedge-gallery" or meta.get("format") not in READABLE_FORMATS:
            raise DataError(
                f"{path}: not a thzedge gallery of format {' or '.join(map(str, READABLE_FORMATS))} "
                f"(found {meta.get('format')!r}); re-enrol with this version of thzedge"
            )
        if meta["format"] == 1:
            # Format 1 kept no postures: match by the nearest reference until re-enrolled.
            log.warning(
                "gallery %s is format 1 (no reference postures): matching by nearest reference; "
                "re-enrol to match by posture",
                path,
            )
            postures = np.full(emb.shape[0] if emb.ndim == 2 else 0, UNKNOWN_POSTURE, np.int8)
        elif postures is None:
            raise DataError(f"{path}: format {meta['format']} gallery without reference postures; re-enrol")
        dim = int(meta["embedding_dim"])
        names = meta["identities"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DataError(f"{path}: gallery identities must be a list of names; re-enrol")
        if not isinstance(meta.get("bundle_sha256"), str):
            raise DataError(f"{path}: gallery metadata lacks the bundle it was enrolled with; re-enrol")
        if emb.ndim != 2 or emb.shape[1] != dim or labels.shape != (emb.shape[0],):
            raise DataError(f"{path}: embeddings/labels shapes do not match the header; re-enrol")
        if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
            raise DataError(f"{path}: labels point outside the identity list; re-enrol")
        postures = _posture_rows(postures, emb.shape[0], f"{path} reference postures")
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
                g._ref_postures[name] = postures[labels == i]
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
    bundle = Bundle.open(bundle_path)
    rows: list[np.ndarray] = []
    source = open_source(source_uri)
    try:
        # As the daemon decides: configured, else what the source carries, else identity.
        choice = resolve_profile(calibration, source)
        profile = choice.profile
        if profile is None:
            log.warning("no calibration profile given: enrolling uncorrected frames (identity calibration)")
        elif calibration is None:
            log.info("no calibration profile given: using %s (profile %s)", choice.origin, profile.profile_id)
        params = profile.conditioning if profile is not None else ConditioningParams()
        if conditioning is not None:
            params = conditioning.apply(params)
        deadline = time.monotonic() + timeout_s
        while len(rows) < frames:
            if time.monotonic() > deadline:
                raise ThzEdgeError(f"{source_uri}: got {len(rows)} of {frames} frames within {timeout_s:g} s")
            item = source.read(0.5)
            if item is None:
                if source.exhausted:
                    raise ThzEdgeError(f"{source_uri} ended after {len(rows)} of {frames} frames")
                continue
            if isinstance(item, MalformedFrame):  # skip it, as the daemon would
                log.warning("skipped a malformed frame: %s", item.reason)
                continue
            rows.append(calibrate_and_condition(item.data, profile, params))
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
    gallery = (
        Gallery.load(gallery_path, bundle, precision=precision, require_threshold=False)
        if Path(gallery_path).exists()
        else Gallery.for_bundle(bundle, precision=precision)
    )
    _check_identity(identity)
    runner = Runner.from_bundle(bundle, backend=backend, precision=precision)
    try:
        out = runner.infer(x, reconstruct=False)
    finally:
        runner.close()
    embs = np.asarray(out.embedding, np.float32)
    # Each reference keeps its predicted posture (as the daemon predicts a probe's) for matching.
    postures = out.posture
    gallery.enroll(identity, embs, replace=replace, postures=postures)
    gallery.save(gallery_path)
    return gallery, int(x.shape[0])


def _check_identity(identity: str) -> None:
    if not isinstance(identity, str) or not identity.strip():
        raise ThzEdgeError("identity must be a non-empty name")
    if len(identity) > MAX_IDENTITY_LEN or not identity.isprintable():
        raise ThzEdgeError(f"identity must be printable and at most {MAX_IDENTITY_LEN} characters")


def _posture_rows(p: Any, k: int, what: str) -> np.ndarray:
    """Return postures [k] as int8 (None: all unknown); DataError when out of -1..4 or mis-sized."""
    if p is None:
        return np.full(k, UNKNOWN_POSTURE, np.int8)
    a = np.asarray(p)
    if a.shape != (k,) or (a.size and not np.issubdtype(a.dtype, np.integer)):
        raise DataError(f"{what}: expected {k} integer postures, got shape {tuple(a.shape)} {a.dtype}")
    if a.size and (a.min() < UNKNOWN_POSTURE or a.max() >= len(POSTURES)):
        raise DataError(f"{what}: postures must be 0..{len(POSTURES) - 1} (or -1 unknown)")
    return a.astype(np.int8)


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
