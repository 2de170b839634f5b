"""Config loading: defaults, typed sections, nearest-key errors, security and privacy rules."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import tomllib

from edge.config import (
    DEFAULT_METRICS_PORT,
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    load_config,
    log_start_warnings,
)
from scanner_io.errors import EXIT_CONFIG

EXAMPLE = Path(__file__).resolve().parents[2] / "systemd" / "thzedge.toml"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "thzedge.toml"
    p.write_text(text)
    return p


def test_missing_default_file_gives_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("THZEDGE_CONFIG", raising=False)
    monkeypatch.setattr("edge.config.DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    cfg = load_config(None)
    assert cfg.path is None
    assert cfg.sources == {}
    assert cfg.model.backend == "auto" and cfg.model.bundle is None
    assert cfg.metrics.bind == f"127.0.0.1:{DEFAULT_METRICS_PORT}"  # R-SEC-4
    assert (
        cfg.privacy.publish_embedding,
        cfg.privacy.publish_reconstruction,
        cfg.privacy.record_results,
    ) == (
        False,
        False,
        False,
    )
    assert cfg.publisher.endpoint.startswith("ipc://")
    assert cfg.daemon.stop_timeout_s == 5.0
    assert not cfg.daemon.insecure_dev


def test_env_var_names_the_file(monkeypatch, tmp_path):
    p = write(tmp_path, "[model]\nbackend = 'ort'\n")
    monkeypatch.setenv("THZEDGE_CONFIG", str(p))
    assert load_config(None).model.backend == "ort"


def test_explicit_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_full_file_is_typed_and_paths_resolve_relative_to_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("CREDS", "/run/credentials/thzedge@scanner0.service")
    p = write(
        tmp_path,
        """
[sources.scanner0]
uri = "tcp://10.0.0.5:5555"
calibration = "profiles/scanner0.npz"

[model]
bundle = "/opt/thzedge/bundle"
backend = "ort"
precision = "fp16"
max_batch = 4

[publisher]
endpoint = "tcp://0.0.0.0:5560"
hwm = 50
[publisher.curve]
enabled = true
secret_key_file = "${CREDS}/server.key_secret"
allowed_clients_dir = "clients"

[metrics]
bind = "[::1]:9100"

[verification]
mode = "1:N"
gallery = "gallery.npz"
threshold = 0.6

[daemon]
queue_size = 16
max_age_s = 1
insecure_dev = true
""",
    )
    cfg = load_config(p)
    assert cfg.path == p
    s = cfg.sources["scanner0"]
    assert s.uri == "tcp://10.0.0.5:5555" and s.name == "scanner0"
    assert s.calibration == tmp_path / "profiles" / "scanner0.npz"
    assert cfg.model.bundle == Path("/opt/thzedge/bundle") and cfg.model.max_batch == 4
    assert cfg.model.precision == "fp16"
    assert cfg.publisher.hwm == 50 and cfg.publisher.curve.enabled
    assert cfg.publisher.curve.secret_key_file == Path(
        "/run/credentials/thzedge@scanner0.service/server.key_secret"
    )
    assert cfg.publisher.curve.allowed_clients_dir == tmp_path / "clients"
    assert (cfg.metrics.host, cfg.metrics.port) == ("::1", 9100)
    assert cfg.verification.threshold == 0.6 and cfg.verification.gallery == tmp_path / "gallery.npz"
    assert cfg.daemon.max_age_s == 1.0 and isinstance(cfg.daemon.max_age_s, float)
    assert cfg.source_names() == {"scanner0": "tcp://10.0.0.5:5555"}
    # frozen
    with pytest.raises(AttributeError):
        cfg.model.backend = "trt"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"modle": {}}, "unknown key 'modle'; did you mean 'model'?"),
        ({"model": {"backnd": "ort"}}, "[model]: unknown key 'backnd'; did you mean 'backend'?"),
        (
            {"publisher": {"curve": {"enabeld": True}}},
            "[publisher.curve]: unknown key 'enabeld'; did you mean 'enabled'?",
        ),
        ({"sources": {"s0": {"url": "sim"}}}, "[sources.s0]: unknown key 'url'; did you mean 'uri'?"),
        ({"daemon": {"stop_timeout": 3}}, "did you mean 'stop_timeout_s'?"),
        ({"model": {"backend": "tensorrt"}}, 'backend = "tensorrt": expected one of "auto", "ort", "trt"'),
        ({"model": {"precision": 16}}, "expected a string"),
        ({"daemon": {"queue_size": True}}, "queue_size = true: expected an integer"),
        ({"daemon": {"queue_size": 1.5}}, "queue_size = 1.5: expected an integer"),
        ({"daemon": {"queue_size": 0}}, "must be >= 1"),
        ({"verification": {"threshold": "0.5"}}, 'threshold = "0.5": expected a number'),
        ({"verification": {"threshold": 2.5}}, "threshold = 2.5: must be <= 2.0"),
        ({"verification": {"mode": "1:n"}}, "expected one of"),
        ({"verification": {"mode": "1:N"}}, "needs gallery"),
        ({"publisher": {"ipc_mode": 0o644}}, "ipc_mode = 0o644: expected one of 0o600, 0o660"),
        ({"publisher": {"ipc_mode": 0o660}}, "needs ipc_group"),
        ({"publisher": {"wait_subscriber_s": -1.0}}, "wait_subscriber_s = -1.0: must be >= 0"),
        ({"publisher": {"endpoint": "udp://x"}}, "expected ipc://PATH or tcp://HOST:PORT"),
        ({"metrics": {"bind": "localhost"}}, "expected HOST:PORT"),
        ({"sources": {"s0": {}}}, "missing key 'uri'"),
        ({"sources": {"s0": {"uri": "scanner"}}}, "expected sim…, replay:FILE"),
        ({"model": {"bundle": "${THZEDGE_SURELY_UNSET}/b"}}, "THZEDGE_SURELY_UNSET is not set"),
        ({"model": []}, "expected a table"),
    ],
)
def test_bad_config_names_the_problem(raw, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    assert message in str(info.value)
    assert info.value.exit_code == EXIT_CONFIG


def test_file_errors_name_the_file(tmp_path):
    p = write(tmp_path, "[daemon]\nqueue_sise = 3\n")
    with pytest.raises(ConfigError, match=f"{p}.*did you mean 'queue_size'"):
        load_config(p)
    p = write(tmp_path, "[daemon\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)
    p = write(tmp_path, "[publisher]\nendpoint = 'tcp://127.0.0.1:5000'\n")
    with pytest.raises(ConfigError, match=f"^{p}: publisher endpoint"):
        load_config(p)


# R-SEC-1 / R-NEW-1 validation matrix: (endpoint, curve, insecure_dev, embedding, reconstruction) -> ok?
@pytest.mark.parametrize(
    ("endpoint", "curve", "insecure", "emb", "rec", "ok"),
    [
        ("ipc:///tmp/x.sock", False, False, False, False, True),
        ("ipc:///tmp/x.sock", False, False, True, True, True),  # local socket, 0600: allowed
        ("tcp://127.0.0.1:5000", False, False, False, False, False),  # R-SEC-1
        ("tcp://127.0.0.1:5000", False, True, False, False, True),  # dev override
        ("tcp://127.0.0.1:5000", False, True, True, False, False),  # biometric never on plain tcp
        ("tcp://127.0.0.1:5000", False, True, False, True, False),
        ("tcp://127.0.0.1:5000", True, False, True, True, True),  # CURVE + ZAP allow-list
    ],
)
def test_security_and_privacy_matrix(tmp_path, endpoint, curve, insecure, emb, rec, ok):
    raw = {
        "publisher": {"endpoint": endpoint},
        "daemon": {"insecure_dev": insecure},
        "privacy": {"publish_embedding": emb, "publish_reconstruction": rec},
    }
    if curve:
        raw["publisher"]["curve"] = {
            "enabled": True,
            "secret_key_file": str(tmp_path / "server.key_secret"),
            "allowed_clients_dir": str(tmp_path / "clients"),
        }
    if ok:
        config_from_dict(raw)
    else:
        with pytest.raises(ConfigError):
            config_from_dict(raw)


def test_curve_needs_keys_and_tcp():
    with pytest.raises(ConfigError, match="secret_key_file"):
        config_from_dict({"publisher": {"endpoint": "tcp://127.0.0.1:1", "curve": {"enabled": True}}})
    with pytest.raises(ConfigError, match="needs a tcp:// endpoint"):
        config_from_dict({"publisher": {"curve": {"enabled": True}}})


def test_tcp_source_needs_insecure_dev_and_is_warned_every_start(caplog):
    with pytest.raises(ConfigError, match="source 'scanner0'.*insecure_dev"):
        config_from_dict({"sources": {"scanner0": "tcp://10.0.0.5:5555"}})
    cfg = config_from_dict({"sources": {"scanner0": "tcp://10.0.0.5:5555"}, "daemon": {"insecure_dev": True}})
    with caplog.at_level(logging.WARNING, logger="thzedge.config"):
        log_start_warnings(cfg)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "insecure_dev" in warnings[0].getMessage()
    assert "tcp://10.0.0.5:5555" in warnings[0].getMessage()


def test_a_tcp_source_given_as_a_uri_follows_the_same_rule(caplog):
    """`thzedge run --source tcp://…` must not slip past R-SEC-1 by not being in the config."""
    with pytest.raises(ConfigError, match="tcp://10.0.0.5:5555 is tcp without CURVE.*insecure_dev"):
        config_from_dict({}).resolve_source("tcp://10.0.0.5:5555")
    cfg = config_from_dict({"daemon": {"insecure_dev": True}})
    with caplog.at_level(logging.WARNING, logger="thzedge.config"):
        assert cfg.resolve_source("tcp://10.0.0.5:5555").uri == "tcp://10.0.0.5:5555"
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("tcp://10.0.0.5:5555" in m for m in warned)
    assert config_from_dict({}).resolve_source("ipc:///run/x.sock").uri == "ipc:///run/x.sock"


def test_resolve_source_by_name_or_uri():
    cfg = config_from_dict({"sources": {"scanner0": {"uri": "sim?seed=3"}}})
    assert cfg.resolve_source("scanner0").uri == "sim?seed=3"
    assert cfg.resolve_source("replay:/data/a.mcap").uri == "replay:/data/a.mcap"
    assert cfg.resolve_source("ipc:///run/x").uri == "ipc:///run/x"
    with pytest.raises(ConfigError, match="did you mean 'scanner0'"):
        cfg.resolve_source("scaner0")


def test_overrides_are_validated_like_the_file():
    cfg = Config()
    out = apply_overrides(cfg, model={"backend": "ort", "bundle": None}, publisher={"hwm": 5})
    assert out.model.backend == "ort" and out.publisher.hwm == 5
    assert out.publisher.endpoint == cfg.publisher.endpoint
    with pytest.raises(ConfigError, match="expected one of"):
        apply_overrides(cfg, model={"backend": "cuda"})
    with pytest.raises(ConfigError, match="R-SEC-1"):
        apply_overrides(cfg, publisher={"endpoint": "tcp://127.0.0.1:7000"})
    ok = apply_overrides(cfg, publisher={"endpoint": "tcp://127.0.0.1:7000"}, daemon={"insecure_dev": True})
    assert ok.daemon.insecure_dev
    with pytest.raises(ConfigError, match="did you mean 'publisher'"):
        apply_overrides(cfg, publsher={"hwm": 1})


def test_show_output_round_trips(tmp_path):
    cfg = config_from_dict(
        {"sources": {"scanner0": {"uri": "sim"}}, "model": {"max_batch": 8}, "publisher": {"hwm": 7}}
    )
    text = cfg.to_toml()
    again = config_from_dict(tomllib.loads(text))
    assert again.to_dict() == cfg.to_dict()
    assert again.model.max_batch == 8 and again.sources["scanner0"].uri == "sim"


def test_shipped_example_is_valid():
    if not EXAMPLE.exists():
        pytest.skip("systemd/thzedge.toml not written yet")
    cfg = load_config(EXAMPLE)
    assert "scanner0" in cfg.sources


def test_conditioning_overrides_are_checked_against_conditioning_params():
    from calibration.conditioning import ConditioningParams

    cfg = config_from_dict(
        {"sources": {"s0": {"uri": "sim", "conditioning": {"db_min": 5, "roi": [1, 2, 30, 40]}}}}
    )
    cond = cfg.sources["s0"].conditioning
    params = cond.apply(ConditioningParams(db_max=60.0))
    assert params.db_min == 5.0 and params.roi == (1, 2, 30, 40) and params.db_max == 60.0
    with pytest.raises(
        ConfigError, match=r"\[sources.s0.conditioning\]: unknown key 'dbmin'; did you mean 'db_min'"
    ):
        config_from_dict({"sources": {"s0": {"uri": "sim", "conditioning": {"dbmin": 3}}}})
    with pytest.raises(ConfigError, match="roi = \\[1, 2, 3\\]: expected 4 values"):
        config_from_dict({"sources": {"s0": {"uri": "sim", "conditioning": {"roi": [1, 2, 3]}}}})
    # Cross-field rules are checked against the profile's own values when applied.
    high = config_from_dict({"sources": {"s0": {"uri": "sim", "conditioning": {"db_min": 50}}}})
    assert high.sources["s0"].conditioning.apply(ConditioningParams(db_max=60.0)).db_min == 50.0
    with pytest.raises(ConfigError, match="db_max .* must be greater than db_min"):
        high.sources["s0"].conditioning.apply(ConditioningParams(db_max=46.0))


def test_env_vars_give_each_instance_its_own_port_and_socket(monkeypatch):
    """The multi-scanner recipe in docs/operations.md: one file, per-instance values from drop-ins."""
    raw = {
        "metrics": {"bind": "127.0.0.1:${THZEDGE_METRICS_PORT}"},
        "publisher": {"endpoint": "ipc://${RUNTIME_DIRECTORY}/results.sock"},
    }
    monkeypatch.setenv("THZEDGE_METRICS_PORT", "9465")
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/thzedge/scanner1")
    cfg = config_from_dict(raw)
    assert cfg.metrics.port == 9465
    assert cfg.publisher.endpoint == "ipc:///run/thzedge/scanner1/results.sock"
    monkeypatch.setenv("THZEDGE_METRICS_PORT", "http")
    with pytest.raises(ConfigError, match="expected HOST:PORT"):
        config_from_dict(raw)
