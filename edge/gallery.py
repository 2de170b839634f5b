"""The enrolment gallery: reference templates per identity, tied to the encoder that made them.

Biometric data (GDPR Art. 9): the file is written with mode 0600, identities and embeddings
never go to logs (only counts do). With a template key (`edge.templates`, R-NEW-3) the gallery
stores and compares keyed projections of the embeddings, never the embeddings themselves.

What binds a gallery to a model is what makes embeddings comparable: the **fp32 encoder graph's
sha256** and the embedding contract (dimension, unit length, Euclidean distance) — not the whole
manifest, so `export threshold` or `export quantize` (which rewrite the manifest) leave it valid.
A gallery enrolled with another encoder is refused. Enrolled at one precision and probed at
another (fp32 ↔ int8 of the same encoder) is allowed when that variant's accuracy gate passed,
and the gate's measured embedding agreement is logged; without a passed gate it is refused.

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

File format 3 (`.npz`, loaded with `allow_pickle=False`): `embeddings` float32 [M, D] (the
templates: keyed projections when `meta.template` names a key, else plaintext), `labels` int32
[M] (index into the identity list), `postures` int8 [M] (predicted posture of each reference, -1
unknown) and `meta`, a JSON string: format version, `encoder_sha256` (the binding), bundle
sha256 (informative), embedding contract, precision, `template` (scheme, key id and epoch, or
null), identities, created time. Format 2 (bound to the manifest sha256, plaintext) and format 1
(no postures either) are read and written back as format 3.
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
import stat
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from calibration.conditioning import ConditioningParams, calibrate, condition
from calibration.profile import resolve_profile
from calibration.quality import assess_frame
from edge.bundle import Bundle
from edge.infer import load_inputs
from edge.runner import Runner
from edge.templates import TemplateKey
from scanner_io.atrest import find_storage_key, is_sealed, seal, unseal
from scanner_io.choices import Choice
from scanner_io.errors import ConfigError, DataError, ThzEdgeError
from scanner_io.frame import POSTURES
from scanner_io.npz import read_npz
from scanner_io.private_file import write_private
from scanner_io.sources import CurveClientKeys, MalformedFrame, open_source

log = logging.getLogger("thzedge.gallery")

GALLERY_FORMAT = 3
READABLE_FORMATS = (1, 2, 3)
# What a sealed gallery file says it holds (scanner_io.atrest envelope).
GALLERY_SEAL_KIND = "thzedge-gallery"
# What makes two embeddings comparable besides the encoder's weights.
EMBEDDING_CONTRACT = {"output": "embedding", "norm": "unit", "metric": "euclidean"}
UNKNOWN_POSTURE = -1
MAX_IDENTITY_LEN = 128
DECISIONS = ("accept", "reject", "unknown")


class VerificationMode(Choice):
    """How a probe is matched: auto (1:1 when the frame claims an identity, else 1:N), or fixed."""

    auto = "auto"
    one_to_one = "1:1"
    one_to_n = "1:N"
    off = "off"


def is_one_to_one(mode: VerificationMode, claimed: str | None) -> bool:
    """Whether the daemon's rule verifies this probe 1:1 (forced, or auto with a claimed identity)."""
    return mode is VerificationMode.one_to_one or (mode is VerificationMode.auto and claimed is not None)


def match_probe(
    gallery: Gallery,
    embedding: np.ndarray,
    claimed: str | None,
    posture: int,
    mode: VerificationMode,
    scores: Scores | None = None,
) -> Match | None:
    """Match one probe by the daemon's rule: 1:1 for a claimed identity (auto), else 1:N; None when off.

    The references compared are those of the probe's predicted `posture`; `scores`, when the
    caller already has them (`gallery.scores`), are used instead of computing them again. Raises
    ValueError for 1:1 without a claimed identity.
    """
    if mode is VerificationMode.off:
        return None
    if is_one_to_one(mode, claimed):
        if claimed is None:
            raise ValueError("1:1 verification needs claimed_identity in the frame header")
        if scores is not None:
            return gallery.decide_1to1(scores, claimed)
        return gallery.match_1to1(embedding, claimed, posture=posture)
    return gallery.decide_1toN(scores if scores is not None else gallery.scores(embedding, posture))


@dataclass(frozen=True)
class Scores:
    """One probe's distance to every enrolled identity, with the names in the same order."""

    names: tuple[str, ...]
    distances: np.ndarray  # [identities] float


# names, references [M, D] (float64) grouped by identity in name order, their squared norms [M],
# their postures [M], each identity's first row
_View = tuple[tuple[str, ...], np.ndarray, np.ndarray, np.ndarray, np.ndarray]


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
    """Enrolled identities and their templates for one encoder; thread-safe to read.

    `encoder_sha256` binds it (the fp32 encoder graph's sha256; for a format-2 file read back,
    the manifest sha256 it was bound to). With `template_key`, `enroll` stores and every match
    compares keyed projections (`edge.templates`); plaintext embeddings are never kept.
    """

    def __init__(
        self,
        encoder_sha256: str,
        embedding_dim: int,
        threshold: float | None = None,
        precision: str = "fp32",
        template_key: TemplateKey | None = None,
        bundle_sha256: str = "",
    ) -> None:
        self.encoder_sha256 = encoder_sha256
        self.bundle_sha256 = bundle_sha256 or encoder_sha256
        self.embedding_dim = int(embedding_dim)
        self.threshold = threshold
        self.precision = precision
        self.template_key = template_key
        # The stored key description (scheme, id, epoch): kept when the file is rewritten by a
        # caller without the key (`gallery remove`), which can then not match.
        self._template_meta: dict[str, Any] | None = None if template_key is None else template_key.describe()
        self._legacy_binding = False  # format 2: bound to a manifest sha256, not to an encoder
        self.created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self._refs: dict[str, np.ndarray] = {}  # identity -> [k, D] unit embeddings
        self._ref_postures: dict[str, np.ndarray] = {}  # identity -> [k] int8 posture (-1 unknown)
        self._lock = threading.Lock()
        # Matching view, swapped in one assignment by _rebuild: names, all references [M, D]
        # grouped by identity in name order, their postures [M] and each identity's first row.
        self._view: _View = (
            (),
            np.zeros((0, self.embedding_dim), np.float64),
            np.zeros(0, np.float64),
            np.zeros(0, np.int8),
            np.zeros(0, np.intp),
        )

    # -- building -------------------------------------------------------------------------------

    @classmethod
    def for_bundle(
        cls,
        bundle: Any,
        threshold: float | None = None,
        precision: str = "fp32",
        template_key: TemplateKey | None = None,
    ) -> Gallery:
        """Return an empty gallery for a `Bundle` (threshold defaults to the bundle's)."""
        if threshold is None:
            threshold = bundle.threshold(precision)
        return cls(
            bundle.encoder_sha256,
            bundle.embedding_dim,
            threshold,
            precision,
            template_key=template_key,
            bundle_sha256=bundle.sha256,
        )

    def protect(self, embeddings: np.ndarray) -> np.ndarray:
        """Return the gallery's form of unit embeddings: the keyed templates, or them as they are."""
        key = self.template_key
        if key is None and self._template_meta is not None:
            raise ConfigError(
                "this gallery holds protected templates: load it with its template key to match"
            )
        return embeddings if key is None else key.project(embeddings)

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
        e = self.protect(_unit_rows(embeddings, self.embedding_dim, "enrolment embeddings"))
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
            refs = np.concatenate([self._refs[n] for n in names]).astype(np.float64)
            post = np.concatenate([self._ref_postures[n] for n in names]).astype(np.int8)
            counts = np.array([self._refs[n].shape[0] for n in names], np.intp)
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.intp)
        else:
            refs = np.zeros((0, self.embedding_dim), np.float64)
            post, starts = np.zeros(0, np.int8), np.zeros(0, np.intp)
        # One assignment, so a reader never sees names and references out of step.
        self._view = (tuple(names), refs, np.einsum("ij,ij->i", refs, refs), post, starts)

    # -- reading --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._view[0])

    def __contains__(self, identity: object) -> bool:
        return identity in self._refs

    @property
    def identities(self) -> tuple[str, ...]:
        """Enrolled identity names (sorted). Personal data: do not log them."""
        return self._view[0]

    @property
    def template_description(self) -> dict[str, Any] | None:
        """How references are protected: scheme, key id and epoch (None: plaintext embeddings)."""
        return None if self._template_meta is None else dict(self._template_meta)

    def reference_count(self, identity: str) -> int:
        """How many embeddings were enrolled for `identity` (0 if none)."""
        refs = self._refs.get(identity)
        return 0 if refs is None else int(refs.shape[0])

    def enrolled_postures(self, identity: str) -> tuple[int, ...]:
        """The distinct postures (0..4; -1 unknown) of `identity`'s references, sorted."""
        p = self._ref_postures.get(identity)
        return () if p is None else tuple(int(v) for v in np.unique(p))

    def __repr__(self) -> str:
        key = "plaintext" if self.template_key is None else f"key epoch {self.template_key.epoch}"
        return (
            f"Gallery(identities={len(self)}, encoder={self.encoder_sha256[:12]}, "
            f"threshold={self.threshold}, {key})"
        )

    # -- matching -------------------------------------------------------------------------------

    def decision_threshold(self) -> float:
        """The distance threshold matches are decided with; ConfigError when there is none."""
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
        probe = _unit_rows(np.asarray(embedding).reshape(1, -1), self.embedding_dim, "probe embedding")
        probe = self.protect(probe)[0].astype(np.float64)
        _, refs, sq, post, starts = view
        if refs.shape[0] == 0:
            return np.zeros(0, np.float64)
        # |r - q|² = |r|² + |q|² - 2 r·q in float64: one matrix-vector product instead of an [M, D]
        # difference array (6.6× faster per probe at 15,000 references, benchmarks/bench_gallery.py),
        # within float32 rounding of it.
        d = np.sqrt(np.maximum(sq + probe @ probe - 2.0 * (refs @ probe), 0.0))
        nearest = np.minimum.reduceat(d, starts)
        if posture is None or int(posture) < 0:
            return nearest
        same = np.minimum.reduceat(np.where(post == int(posture), d, np.inf), starts)
        return np.where(np.isfinite(same), same, nearest)

    def scores(self, embedding: np.ndarray, posture: int | None = None) -> Scores:
        """`distances` with the identity names they belong to (one consistent view of the gallery)."""
        view = self._view
        return Scores(view[0], self._distances(view, embedding, posture))

    def match_1to1(self, embedding: np.ndarray, identity: str, posture: int | None = None) -> Match:
        """Verify a claimed identity: accept when the distance to its reference (of the probe's
        posture, else the nearest) is <= threshold."""
        t = self.decision_threshold()
        if identity not in self._view[0]:  # no distances needed
            return Match(identity=identity, score=None, decision="unknown", threshold=t, mode="1:1")
        return self.decide_1to1(self.scores(embedding, posture), identity)

    def match_1toN(self, embedding: np.ndarray, posture: int | None = None) -> Match:  # noqa: N802 - the contract's name
        """Identify: the closest enrolled identity if within the threshold, else `unknown`."""
        return self.decide_1toN(self.scores(embedding, posture))

    def decide_1to1(self, scores: Scores, identity: str, threshold: float | None = None) -> Match:
        """The 1:1 decision for `identity` from a probe's `scores` (at `threshold`, default the gallery's)."""
        t = self.decision_threshold() if threshold is None else float(threshold)
        try:
            i = scores.names.index(identity)
        except ValueError:
            return Match(identity=identity, score=None, decision="unknown", threshold=t, mode="1:1")
        d = float(scores.distances[i])
        return Match(identity, d, "accept" if d <= t else "reject", t, "1:1")

    def decide_1toN(self, scores: Scores, threshold: float | None = None) -> Match:  # noqa: N802 - the contract's name
        """The 1:N decision from a probe's `scores`: the closest identity if within the threshold."""
        t = self.decision_threshold() if threshold is None else float(threshold)
        d = scores.distances
        if d.size == 0:
            return Match(None, None, "unknown", t, "1:N")
        best = int(np.argmin(d))
        score = float(d[best])
        if score <= t:
            return Match(scores.names[best], score, "accept", t, "1:N")
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
            "encoder_sha256": None if self._legacy_binding else self.encoder_sha256,
            "bundle_sha256": self.bundle_sha256,
            "embedding_dim": self.embedding_dim,
            "embedding": EMBEDDING_CONTRACT,
            "precision": self.precision,
            "template": self._template_meta,
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
        write_private(path, data)  # owner only, whatever the umask
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
        template_key: TemplateKey | None = None,
        need_key: bool = True,
    ) -> Gallery:
        """Read a gallery; refuse it when `bundle` (a Bundle) has another encoder than it was enrolled with.

        The threshold is `threshold` if given, else the bundle's for `precision`; with a bundle
        and no threshold at all, loading fails (ConfigError) unless `require_threshold` is False,
        so a daemon never starts with verification it cannot decide. A gallery of protected
        templates needs the key it was enrolled under (`template_key`); another key (a rotated
        one) means its templates are revoked: ConfigError, re-enrol. `need_key=False` reads it
        without the key, for inspecting or deleting identities (it cannot match then).
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
            return cls._from_arrays(
                path, z, bundle, threshold, precision, require_threshold, template_key, need_key
            )
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
        template_key: TemplateKey | None,
        need_key: bool,
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
        if meta.get("embedding", EMBEDDING_CONTRACT) != EMBEDDING_CONTRACT:
            raise DataError(f"{path}: embedding contract {meta.get('embedding')} is not {EMBEDDING_CONTRACT}")
        postures = _posture_rows(postures, emb.shape[0], f"{path} reference postures")
        stored_key = meta.get("template")
        if need_key or template_key is not None:
            _check_template_key(path, stored_key, template_key)
        encoder_sha = meta.get("encoder_sha256")
        legacy = encoder_sha is None  # formats 1 and 2 were bound to the manifest sha256
        enrolled_precision = str(meta.get("precision", precision))
        if bundle is not None:
            _check_binding(path, meta, bundle, legacy)
            if enrolled_precision != precision:
                _check_cross_precision(path, bundle, enrolled_precision, precision)
            if threshold is None:
                threshold = bundle.threshold(precision)
            if threshold is None and require_threshold:
                raise ConfigError(
                    f"bundle {bundle.sha256[:12]} has no verification threshold for {precision}: set "
                    "[verification] threshold (Euclidean distance, e.g. the EER one from `thzedge eval`)"
                )
            if legacy:
                # Bound to this very manifest, so its encoder is this one: written back as format 3.
                encoder_sha, legacy = bundle.encoder_sha256, False
        g = cls(
            encoder_sha if encoder_sha is not None else meta["bundle_sha256"],
            dim,
            threshold,
            enrolled_precision,
            template_key=template_key,
            bundle_sha256=meta["bundle_sha256"],
        )
        g._legacy_binding = legacy
        g._template_meta = stored_key
        g.created = meta.get("created", g.created)
        for i, name in enumerate(names):
            rows = emb[labels == i]
            if rows.shape[0]:
                g._refs[name] = _unit_rows(rows, dim, f"{path} references")
                g._ref_postures[name] = postures[labels == i]
        g._rebuild()
        log.info("gallery loaded: %d identities (encoder %s)", len(g), g.encoder_sha256[:12])
        return g


def _check_template_key(path: Path, stored: Any, key: TemplateKey | None) -> None:
    """Refuse a gallery whose templates need another key than `key` (or one when there is none)."""
    if stored is None:
        if key is not None:
            raise ConfigError(
                f"gallery {path} holds plaintext embeddings but a template key is configured: "
                "re-enrol into a new gallery so the references are protected templates (R-NEW-3)"
            )
        log.warning(
            "gallery %s holds plaintext embeddings: configure a template key and re-enrol (R-NEW-3)", path
        )
        return
    if key is None:
        raise ConfigError(
            f"gallery {path} holds protected templates (key {stored.get('key_id')}, epoch "
            f"{stored.get('epoch')}): set [verification] template_key (or --template-key) to that key file"
        )
    if stored.get("key_id") != key.key_id:
        raise ConfigError(
            f"gallery {path} was enrolled under template key {stored.get('key_id')} (epoch "
            f"{stored.get('epoch')}); the configured key is {key.key_id} (epoch {key.epoch}): its "
            "templates are revoked; re-enrol everyone under the new key"
        )


def _check_binding(path: Path, meta: dict[str, Any], bundle: Any, legacy: bool) -> None:
    """Refuse a gallery whose embeddings another encoder made (format 2: another manifest)."""
    if int(meta["embedding_dim"]) != int(bundle.embedding_dim):
        raise ConfigError(
            f"gallery {path} holds {meta['embedding_dim']}-d embeddings, the model makes "
            f"{bundle.embedding_dim}-d ones: re-enrol with `thzedge enroll --model <this bundle>`"
        )
    if legacy:
        if meta["bundle_sha256"] != bundle.sha256:
            raise ConfigError(
                f"gallery {path} (format {meta['format']}) was enrolled with model bundle "
                f"{meta['bundle_sha256'][:12]} and records no encoder sha256, but the daemon runs bundle "
                f"{bundle.sha256[:12]}: re-enrol with `thzedge enroll --model <this bundle>`"
            )
        return
    if meta["encoder_sha256"] != bundle.encoder_sha256:
        raise ConfigError(
            f"gallery {path} was enrolled with encoder {meta['encoder_sha256'][:12]}, but the model's "
            f"encoder is {bundle.encoder_sha256[:12]}: embeddings of different encoders do not compare; "
            "re-enrol with `thzedge enroll --model <this bundle>`"
        )


def _check_cross_precision(path: Path, bundle: Any, enrolled: str, running: str) -> None:
    """Allow probing at another precision of the same encoder only where its accuracy gate passed."""
    other = running if enrolled == "fp32" else enrolled
    gate = bundle.accuracy_gate(other)
    if gate is None or not gate.get("passed"):
        why = "has no accuracy gate" if gate is None else "failed its accuracy gate"
        raise ConfigError(
            f"gallery {path} was enrolled at {enrolled} and the daemon runs {running}, but the "
            f"{other} variant {why}, so their embeddings are not shown to agree: run {enrolled} or "
            f"re-enrol at {running}"
        )
    lines = {ln.get("name"): ln.get("candidate") for ln in gate.get("lines", [])}
    med, low = lines.get("embedding cosine (median)"), lines.get("embedding cosine (min)")
    log.info(
        "gallery enrolled at %s, daemon runs %s: the %s accuracy gate measured embedding cosine "
        "median %s, min %s against fp32",
        enrolled,
        running,
        other,
        "n/a" if med is None else f"{med:.4f}",
        "n/a" if low is None else f"{low:.4f}",
    )


def enroll_from_inputs(
    gallery_path: Path,
    bundle_path: Path,
    identity: str,
    inputs: Sequence[Path],
    backend: str = "auto",
    precision: str = "fp32",
    replace: bool = False,
    template_key: TemplateKey | None = None,
) -> tuple[Gallery, int]:
    """Encode conditioned crops (PNG / .npy, as `thzedge infer` reads) and enrol them.

    Creates the gallery file when it does not exist. Returns the gallery and the number of
    embeddings added.
    """
    bundle = Bundle.open(bundle_path)
    batch = load_inputs(inputs)
    return _encode_and_enroll(
        gallery_path, bundle, identity, batch.x, backend, precision, replace, template_key
    )


# Enrolling from the simulator without `session=` takes this session, so the daemon's default
# stream (session 0) probes captures that were never enrolled, as at a real site.
ENROLMENT_SIM_SESSION = 1


def enrolment_source_uri(uri: str) -> str:
    """The URI enrolment reads: a `sim` source without `session=` gets the enrolment session."""
    if not (uri == "sim" or uri.startswith(("sim?", "sim://"))):
        return uri
    query = uri.split("?", 1)[1] if "?" in uri else ""
    if any(part.split("=", 1)[0] == "session" for part in query.split("&") if part):
        return uri
    return f"{uri}{'&' if query else '?'}session={ENROLMENT_SIM_SESSION}"


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
    curve: CurveClientKeys | None = None,
    template_key: TemplateKey | None = None,
) -> tuple[Gallery, int]:
    """Capture `frames` raw frames with a face from a source, calibrate and condition them exactly
    as the daemon does (`calibrate_and_condition` with the scanner's profile), and enrol them.

    Frames with no face (`calibration.quality.assess_frame`, on calibrated frames, as the daemon
    checks them) are skipped and counted; a capture that yields too few within `timeout_s` is
    refused. A `sim` source without `session=` reads the
    enrolment session (`enrolment_source_uri`).
    """
    bundle = Bundle.open(bundle_path)
    rows: list[np.ndarray] = []
    skipped: dict[str, int] = {}
    source_uri = enrolment_source_uri(source_uri)
    source = open_source(source_uri, curve=curve)
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

        def short(what: str) -> ThzEdgeError:
            why = f"; skipped without a face: {_counts(skipped)}" if skipped else ""
            return ThzEdgeError(f"{source_uri}: {what} {len(rows)} of {frames} frames with a face{why}")

        while len(rows) < frames:
            if time.monotonic() > deadline:
                raise short(f"got within {timeout_s:g} s")
            item = source.read(0.5)
            if item is None:
                if source.exhausted:
                    raise short("ended after")
                continue
            if isinstance(item, MalformedFrame):  # skip it, as the daemon would
                log.warning("skipped a malformed frame: %s", item.reason)
                continue
            power = calibrate(item.data, profile, item.header.sensor_temp_c)
            # As the daemon does: the no-head check reads corrected power, so it needs a profile.
            if profile is not None:
                raw = item.data
                integer = np.issubdtype(raw.dtype, np.integer)
                full = float(np.iinfo(raw.dtype).max) if integer else float("inf")
                quality = assess_frame(raw, power, params, full_scale=full)
                if not quality.ok:  # a reference without a face would match nobody, or anybody
                    reason = str(quality.reason)
                    skipped[reason] = skipped.get(reason, 0) + 1
                    continue
            rows.append(condition(power, params))
    finally:
        source.close()
    if skipped:
        log.warning("enrolment skipped %d frame(s) with no face: %s", sum(skipped.values()), _counts(skipped))
    x = np.stack(rows).astype(np.float32)[:, None]
    return _encode_and_enroll(gallery_path, bundle, identity, x, backend, precision, replace, template_key)


def _counts(d: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items()))


def _encode_and_enroll(
    gallery_path: Path,
    bundle: Any,
    identity: str,
    x: np.ndarray,
    backend: str,
    precision: str,
    replace: bool,
    template_key: TemplateKey | None = None,
) -> tuple[Gallery, int]:
    """Open the gallery (or start one for `bundle`), enrol the embeddings of `x`, save it."""
    gallery = (
        Gallery.load(
            gallery_path, bundle, precision=precision, require_threshold=False, template_key=template_key
        )
        if Path(gallery_path).exists()
        else Gallery.for_bundle(bundle, precision=precision, template_key=template_key)
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
