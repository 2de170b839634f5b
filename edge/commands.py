"""Commands owned by the edge package: run, infer, eval, bench, enroll, config, keys, gallery.

`register(app)` attaches them to the root `thzedge` app. `--json` and `--config` are the root's
options; commands read them with `global_options(ctx)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from edge.backends import BackendKind
from edge.bench import bench_model, render_bench
from edge.bundle import Bundle, Precision, demo_bundle_path, model_path
from edge.config import ModelPrecision, load_config
from edge.evaluation import Routing, evaluate, training_people_warning
from edge.gallery import Gallery, enroll_from_inputs, enroll_from_source
from edge.infer import load_inputs, save_results, truth_postures
from edge.ops_cli import register as register_ops
from edge.pipeline.assemble import RunOptions, run_daemon
from edge.pipeline.scoring import render_score
from edge.runner import Runner
from edge.security import check_curve_files, generate_keys, load_keypair, source_curve_keys
from edge.signing import generate_signing_key
from edge.storage import storage_key_from_config
from edge.templates import generate_template_key, load_template_key
from scanner_io.atrest import generate_storage_key
from scanner_io.choices import Choice
from scanner_io.cli_common import global_options, split_choices
from scanner_io.errors import ConfigError, StorageError, ThzEdgeError
from scanner_io.frame import POSTURES
from scanner_io.sources import split_queue_mode


def register(app: typer.Typer) -> None:
    """Attach this package's commands to the root `thzedge` app."""
    app.command("infer")(infer_command)
    app.command("eval")(eval_command)
    app.command("run")(run_command)
    config_app = typer.Typer(help="Show or check the daemon configuration file.", no_args_is_help=True)
    config_app.command("show")(config_show_command)
    config_app.command("validate")(config_validate_command)
    app.add_typer(config_app, name="config")
    keys_app = typer.Typer(
        help="Keys: CURVE (tcp endpoints), storage (data at rest), signing (bundles), "
        "template (gallery templates).",
        no_args_is_help=True,
    )
    keys_app.command("generate")(keys_generate_command)
    keys_app.command("show")(keys_show_command)
    app.add_typer(keys_app, name="keys")
    gallery_app = typer.Typer(help="Inspect or edit an enrolment gallery.", no_args_is_help=True)
    gallery_app.command("info")(gallery_info_command)
    gallery_app.command("remove")(gallery_remove_command)
    app.add_typer(gallery_app, name="gallery")
    app.command("enroll")(enroll_command)
    app.command("bench")(bench_command)
    register_ops(app)


_MODEL_HELP = "Model bundle directory (from `thzedge export onnx`), or `demo` for the shipped demo model."
_BACKEND_HELP = "Inference backend: auto, ort (ONNX Runtime) or trt (TensorRT engine)."
_PRECISION_HELP = "Bundle precision variant to run."


def infer_command(
    inputs: Annotated[
        list[Path],
        typer.Argument(help="Conditioned crops: 8-bit grayscale PNGs, .npy [N,64,64]/[N,1,64,64], or dirs."),
    ],
    model: Annotated[str, typer.Option("--model", help=_MODEL_HELP)],
    out: Annotated[Path, typer.Option("--out", help="Where to write the results (.npz).")],
    backend: Annotated[BackendKind, typer.Option("--backend", help=_BACKEND_HELP)] = BackendKind.auto,
    precision: Annotated[Precision, typer.Option("--precision", help=_PRECISION_HELP)] = Precision.fp32,
    routing: Annotated[
        Routing,
        typer.Option(
            "--routing", help="Decoder by predicted posture, or by the posture in research-format PNG names."
        ),
    ] = Routing.predicted,
    no_reconstruction: Annotated[
        bool, typer.Option("--no-reconstruction", help="Skip the decoders (no reconstruction in the .npz).")
    ] = False,
) -> None:
    """Run a bundle on conditioned 64x64 crops and write embeddings, postures, reconstructions (.npz)."""
    batch = load_inputs(inputs)
    reconstruct = not no_reconstruction
    postures = truth_postures(batch) if reconstruct and routing is Routing.truth else None
    with Runner.from_bundle(model_path(model), backend=backend, precision=precision.value) as runner:
        outputs = runner.infer(batch.x, reconstruct=reconstruct, postures=postures)
        names = runner.postures
    path = save_results(out, outputs, batch.names)
    counts = ", ".join(f"{n} {int((outputs.posture == k).sum())}" for k, n in enumerate(names))
    recon = f"reconstruction routed by {routing.value} posture" if reconstruct else "no reconstruction"
    typer.echo(f"wrote {path}: {len(batch.names)} inputs; predicted postures: {counts}; {recon}")


def eval_command(
    ctx: typer.Context,
    model: Annotated[str, typer.Option("--model", help=_MODEL_HELP)],
    data: Annotated[Path, typer.Option("--data", help="Dataset directory of research-format PNG crops.")],
    triplets: Annotated[Path, typer.Option("--triplets", help="Triplet CSV (anchor,positive,negative).")],
    routing: Annotated[
        Routing,
        typer.Option(
            "--routing", help="Decoder by predicted posture (deployed) or by file-name truth (research)."
        ),
    ] = Routing.predicted,
    backend: Annotated[BackendKind, typer.Option("--backend", help=_BACKEND_HELP)] = BackendKind.auto,
    precision: Annotated[Precision, typer.Option("--precision", help=_PRECISION_HELP)] = Precision.fp32,
) -> None:
    """Score a bundle on a triplet dataset: verification, posture, reconstruction, per posture."""
    note = training_people_warning(Bundle.open(model_path(model)).manifest, data, triplets, precision.value)
    if note is not None:
        typer.echo(f"warning: {note}", err=True)
    with Runner.from_bundle(model_path(model), backend=backend, precision=precision.value) as runner:
        report = evaluate(runner, data, triplets, routing=routing.value)
    typer.echo(json.dumps(report.to_dict(), indent=2) if global_options(ctx).json else report.render())


def run_command(
    ctx: typer.Context,
    source: Annotated[
        str,
        typer.Option(
            "--source",
            help="Frame source: a URI (sim?fps=30, replay:FILE.mcap?rate=max, tcp://HOST:PORT, ipc://PATH) "
            "or a source name from the config file (e.g. scanner0).",
        ),
    ],
    model: Annotated[
        str | None,
        typer.Option(
            "--model", help="Model bundle directory, or `demo` (default: config, else the demo model)."
        ),
    ] = None,
    backend: Annotated[BackendKind | None, typer.Option("--backend", help=_BACKEND_HELP)] = None,
    precision: Annotated[
        ModelPrecision | None,
        typer.Option(
            "--precision",
            help="Bundle precision variant to run; auto = the fastest gate-passed one (default: config).",
        ),
    ] = None,
    publish: Annotated[
        str | None,
        typer.Option("--publish", help="Results endpoint to bind (default: config, else an ipc:// socket)."),
    ] = None,
    record: Annotated[
        Path | None, typer.Option("--record", help="Also record the raw frames to this MCAP file.")
    ] = None,
    max_frames: Annotated[
        int | None,
        typer.Option("--max-frames", help="Stop after this many frames (default: run until stopped)."),
    ] = None,
    no_reconstruction: Annotated[
        bool, typer.Option("--no-reconstruction", help="Skip the decoders (posture and verification only).")
    ] = False,
    record_results: Annotated[
        Path | None,
        typer.Option(
            "--record-results",
            help="Also write the results to this MCAP file (posture, decision, latency channels that "
            "Foxglove plots; identities and reconstructions only with [privacy] record_results).",
        ),
    ] = None,
    metrics_bind: Annotated[
        str | None,
        typer.Option(
            "--metrics-bind",
            help="HOST:PORT of the metrics and health server, or `off` "
            "(default: config, else 127.0.0.1:9464).",
        ),
    ] = None,
    calibration: Annotated[
        Path | None,
        typer.Option(
            "--calibration",
            help="Calibration profile directory for this source (default: the config's, else the "
            "scanner's active one, else what the source carries).",
        ),
    ] = None,
    score: Annotated[
        bool,
        typer.Option(
            "--score",
            help="At the end, score the published results against the simulator's truth "
            "(posture, SSIM, 1:1 TAR/FAR, 1:N identification).",
        ),
    ] = False,
) -> None:
    """Stream frames through the model and publish results until the source ends or a signal stops it."""

    opts = global_options(ctx)
    summary = run_daemon(
        RunOptions(
            source=source,
            model=model_path(model) if model is not None else None,
            config=opts.config,
            backend=backend.value if backend is not None else None,
            precision=precision.value if precision is not None else None,
            publish=publish,
            record=record,
            max_frames=max_frames,
            reconstruction=not no_reconstruction,
            record_results=record_results,
            metrics_bind=metrics_bind,
            calibration=calibration,
            score=score,
        )
    )
    if opts.json:
        typer.echo(json.dumps(summary.to_dict(), sort_keys=True))
    else:
        typer.echo(summary.render())
        if summary.score is not None:
            typer.echo(render_score(summary.score))
    if summary.recording_error is not None:
        # The stream ran to its end, the recording did not: exit 74 (retryable), not 0.
        raise StorageError(summary.recording_error)


def bench_command(
    ctx: typer.Context,
    model: Annotated[
        str | None, typer.Option("--model", help="Model bundle directory, or `demo` (the default).")
    ] = None,
    backend: Annotated[
        str, typer.Option("--backend", help=f"Comma list of backends: {', '.join(BackendKind.values())}.")
    ] = "ort",
    precision: Annotated[
        str, typer.Option("--precision", help=f"Comma list of precisions: {', '.join(Precision.values())}.")
    ] = "fp32",
    batch: Annotated[str, typer.Option("--batch", help="Comma list of batch sizes.")] = "1,8",
    seconds: Annotated[float, typer.Option("--seconds", help="Timing budget per backend x precision.")] = 4.0,
    data: Annotated[
        Path | None, typer.Option("--data", help="Dataset dir whose crops are the inputs (default: random).")
    ] = None,
) -> None:
    """Latency p50/p99 and frames/s per backend x precision x batch, with agreement to fp32."""
    try:
        batches = [int(b) for b in batch.split(",") if b.strip()]
    except ValueError:
        raise ThzEdgeError(f"--batch must be a comma list of integers, got {batch!r}") from None
    backends = [b.value for b in split_choices(BackendKind, backend, "--backend")]
    precisions = [p.value for p in split_choices(Precision, precision, "--precision")]
    rows = bench_model(model_path(model or "demo"), backends, precisions, batches, seconds, data)
    typer.echo(
        json.dumps([r.to_dict() for r in rows], indent=2) if global_options(ctx).json else render_bench(rows)
    )


def config_show_command(ctx: typer.Context) -> None:
    """Print the effective configuration (TOML, or JSON with --json): the file merged with every default."""
    opts = global_options(ctx)
    cfg = load_config(opts.config)
    origin = str(cfg.path) if cfg.path else "built-in defaults (no config file)"
    if opts.json:
        typer.echo(json.dumps({"path": str(cfg.path) if cfg.path else None, **cfg.to_dict()}, indent=2))
    else:
        typer.echo(f"# effective configuration from {origin}\n{cfg.to_toml()}", nl=False)
    for note in cfg.warnings():
        typer.echo(f"warning: {note}", err=True)


def config_validate_command(ctx: typer.Context) -> None:
    """Check a config as `thzedge run` would at start-up (bundle, profiles, gallery, keys); exit 78 if not."""
    from edge.doctor import CheckStatus, static_checks

    opts = global_options(ctx)
    cfg = load_config(opts.config)  # a file that does not parse is one line, exit 78, as before
    check_curve_files(cfg.publisher.curve)  # the key files the daemon would load, loaded the same way
    checks = static_checks(opts.config)
    failed = [c for c in checks if c.status is CheckStatus.fail]
    if opts.json:
        typer.echo(json.dumps({"valid": not failed, "checks": [c.to_dict() for c in checks]}, indent=2))
    for c in checks:
        if c.status is CheckStatus.warn:
            typer.echo(f"warning: {c.name}: {c.detail}", err=True)
    if failed:
        # Every failure in order; the last one is the raised error (exit 78, like `run`).
        for c in failed[:-1]:
            typer.echo(f"thzedge: error: {c.name}: {c.detail}", err=True)
        raise ConfigError(f"{failed[-1].name}: {failed[-1].detail}")
    if not opts.json:
        typer.echo(f"{cfg.path or 'built-in defaults'}: ok ({len(cfg.sources)} source(s))")


class KeyKind(Choice):
    """What `keys generate` makes."""

    curve = "curve"
    storage = "storage"
    signing = "signing"
    template = "template"


_DEFAULT_KEY_NAMES = {
    KeyKind.curve: "server",
    KeyKind.storage: "storage",
    KeyKind.signing: "release",
    KeyKind.template: "template",
}


def keys_generate_command(
    out_dir: Annotated[Path, typer.Option("--out", help="Directory to write the key files into.")],
    kind: Annotated[
        KeyKind,
        typer.Option(
            "--kind",
            help="curve: NAME.key + NAME.key_secret (tcp endpoints); storage: NAME.key, the AES-256 "
            "device key for recordings and galleries; signing: NAME.pub + NAME.sign_key (Ed25519, "
            "bundles); template: NAME.tkey, the gallery template key.",
        ),
    ] = KeyKind.curve,
    name: Annotated[
        str | None,
        typer.Option("--name", help="Key name (default: server, storage, release or template by --kind)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing key files.")] = False,
    rotate: Annotated[
        bool,
        typer.Option("--rotate", help="Template key: replace it by the next epoch (revokes its templates)."),
    ] = False,
    site: Annotated[str, typer.Option("--site", help="Template key: the site it belongs to.")] = "",
) -> None:
    """Create a key: a CURVE pair, the storage key (0600), an Ed25519 signing pair or a template key."""
    name = name or _DEFAULT_KEY_NAMES[kind]
    if kind is KeyKind.template:
        path = generate_template_key(out_dir, name, rotate=rotate, site=site)
        tkey = load_template_key(path)
        typer.echo(
            f"wrote {path} (template key {tkey.key_id}, epoch {tkey.epoch}, 0600); set [verification] "
            "template_key to it and (re-)enrol: templates of other epochs no longer match"
        )
        return
    if kind is KeyKind.storage:
        key = generate_storage_key(Path(out_dir) / f"{name}.key", overwrite=force)
        typer.echo(
            f"storage key {key.key_id}\nwrote {key.path} (secret, 0600); deliver it with "
            f"LoadCredential=storage.key:{key.path} or [storage] key_file"
        )
        return
    if kind is KeyKind.signing:
        public_file, secret_file, kid = generate_signing_key(out_dir, name, overwrite=force)
        typer.echo(
            f"signing key {kid}\nwrote {public_file} (public: into the devices' [model] trusted_keys_dir) "
            f"and {secret_file} (secret, 0600: for `thzedge export sign`)"
        )
        return
    public_file, secret_file = generate_keys(out_dir, name, overwrite=force)
    public = load_keypair(public_file, need_secret=False).public.decode()
    typer.echo(f"public key {public}\nwrote {public_file} (public) and {secret_file} (secret, 0600)")


def keys_show_command(
    key_file: Annotated[Path, typer.Argument(help="A .key or .key_secret certificate file.")],
) -> None:
    """Print the public key of a certificate (never the secret)."""
    typer.echo(load_keypair(key_file, need_secret=False).public.decode())


def enroll_command(
    ctx: typer.Context,
    inputs: Annotated[
        list[Path] | None,
        typer.Argument(help="Conditioned crops, as `thzedge infer` reads: 8-bit PNGs, .npy, or dirs."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", help="Model bundle directory, or `demo` (default: config, else demo)."),
    ] = None,
    gallery: Annotated[
        Path | None, typer.Option("--gallery", help="Gallery .npz to create or extend (default: config).")
    ] = None,
    identity: Annotated[str, typer.Option("--identity", help="Name to enrol (stored, never logged).")] = "",
    source: Annotated[
        str | None,
        typer.Option("--source", help="Capture raw frames instead: a URI or a config source name."),
    ] = None,
    frames: Annotated[int, typer.Option("--frames", help="Frames to capture with --source.")] = 5,
    calibration: Annotated[
        Path | None, typer.Option("--calibration", help="Calibration profile for --source (default: config).")
    ] = None,
    backend: Annotated[BackendKind, typer.Option("--backend", help=_BACKEND_HELP)] = BackendKind.auto,
    precision: Annotated[
        Precision | None, typer.Option("--precision", help=_PRECISION_HELP + " (default: config)")
    ] = None,
    replace: Annotated[
        bool, typer.Option("--replace", help="Replace this identity's references instead of adding.")
    ] = False,
    template_key: Annotated[
        Path | None,
        typer.Option(
            "--template-key", help="Template key (.tkey) protecting the references (default: config)."
        ),
    ] = None,
) -> None:
    """Enrol one identity into a gallery from conditioned crops or from raw frames of a source."""

    if not identity:
        raise ThzEdgeError("--identity NAME is required")
    if bool(inputs) == (source is not None):
        raise ThzEdgeError(
            "give either INPUT files (conditioned crops) or --source URI (raw frames), not both"
        )
    cfg = load_config(global_options(ctx).config)
    storage_key_from_config(cfg)  # the gallery is sealed under the device key (R-SEC-7)
    bundle = model_path(model) if model is not None else cfg.model.bundle or demo_bundle_path()
    gallery_path = gallery or cfg.verification.gallery
    if gallery_path is None:
        raise ThzEdgeError("--gallery FILE.npz is required (or [verification] gallery in the config)")
    # `auto` is the daemon's speed choice; enrolment takes the fp32 reference unless pinned.
    pinned = cfg.model.precision
    prec = precision.value if precision else (pinned.value if pinned != "auto" else Precision.fp32.value)
    key_path = template_key or cfg.verification.template_key
    key = load_template_key(key_path) if key_path is not None else None
    if key is None:
        typer.echo(
            "warning: no template key: references are stored as plaintext embeddings; "
            "`thzedge keys generate --kind template` makes one (R-NEW-3)",
            err=True,
        )
    if source is None:
        g, added = enroll_from_inputs(
            gallery_path, bundle, identity, inputs or [], backend.value, prec, replace, key
        )
    else:
        if frames < 1:
            raise ThzEdgeError("--frames must be at least 1")
        src = cfg.resolve_source(source)
        uri, _ = split_queue_mode(src.uri)  # `mode=` is the daemon's queue policy, not the source's
        g, added = enroll_from_source(
            gallery_path,
            bundle,
            identity,
            uri,
            frames,
            calibration=calibration or src.calibration,
            conditioning=src.conditioning,
            backend=backend.value,
            precision=prec,
            replace=replace,
            template_key=key,
            curve=source_curve_keys(src),
        )
    protection = "plaintext" if key is None else f"templates under key {key.key_id} (epoch {key.epoch})"
    typer.echo(
        f"enrolled {added} embedding(s); {identity!r} now has {g.reference_count(identity)}; "
        f"gallery {gallery_path}: {len(g)} identities, encoder {g.encoder_sha256[:12]}, {protection}"
    )
    if g.threshold is None:
        typer.echo(
            f"warning: the bundle has no verification threshold for {prec} yet: `thzedge run` will "
            "refuse this gallery until `thzedge export threshold` or [verification] threshold sets one",
            err=True,
        )
    # Probes are matched with the references of their posture: say which postures are covered.
    have, missing = _posture_coverage(g, identity)
    gap = f"; missing: {', '.join(missing)} (probes in those match worse; enrol them too)" if missing else ""
    typer.echo(f"postures enrolled: {', '.join(have) or 'none'}{gap}")


def _posture_coverage(g: Gallery, identity: str) -> tuple[list[str], list[str]]:
    """Names of the postures an identity has references of, and of those it lacks."""
    got = set(g.enrolled_postures(identity))
    have = [name for i, name in enumerate(POSTURES) if i in got] + (["unknown"] if -1 in got else [])
    return have, [name for i, name in enumerate(POSTURES) if i not in got]


def gallery_info_command(
    ctx: typer.Context,
    gallery: Annotated[Path, typer.Argument(help="Gallery .npz file.")],
    names: Annotated[bool, typer.Option("--names", help="Also list identity names (personal data).")] = False,
) -> None:
    """Show a gallery's bundle and encoder, template protection and size; names only with --names."""
    storage_key_from_config(load_config(global_options(ctx).config))
    g = Gallery.load(gallery, need_key=False)
    info: dict[str, Any] = {
        "path": str(gallery),
        "encoder_sha256": g.encoder_sha256,
        "bundle_sha256": g.bundle_sha256,
        "embedding_dim": g.embedding_dim,
        "precision": g.precision,
        "identities": len(g),
        "references": sum(g.reference_count(n) for n in g.identities),
        "created": g.created,
        "template": g.template_description,
    }
    if names:
        info["names"] = {n: g.reference_count(n) for n in g.identities}
    if global_options(ctx).json:
        typer.echo(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if key == "template":
            value = _template_line(value)
        if key != "names":
            typer.echo(f"{key}: {value}")
    for n, k in info.get("names", {}).items():
        typer.echo(f"  {n}: {k} reference(s); postures {', '.join(_posture_coverage(g, n)[0])}")


def _template_line(template: dict[str, Any] | None) -> str:
    """`gallery info`'s template line: the scheme and key, or that the references are plaintext."""
    if template is None:
        return "none (plaintext embeddings; configure a template key and re-enrol)"
    shown = {k: v for k, v in template.items() if k != "scheme" and v not in ("", None)}
    rest = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in shown.items())
    return f"{template.get('scheme', '?')}" + (f" ({rest})" if rest else "")


def gallery_remove_command(
    ctx: typer.Context,
    gallery: Annotated[Path, typer.Argument(help="Gallery .npz file.")],
    identity: Annotated[str, typer.Option("--identity", help="Identity to delete with all its references.")],
) -> None:
    """Delete one identity from a gallery (right to erasure); the file is rewritten atomically."""
    storage_key_from_config(load_config(global_options(ctx).config))
    g = Gallery.load(gallery, need_key=False)
    if not g.remove(identity):
        raise ThzEdgeError(f"{identity!r} is not enrolled in {gallery}")
    g.save(gallery)
    typer.echo(f"removed {identity!r}; {len(g)} identities left")
