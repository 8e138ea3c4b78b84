from __future__ import annotations

import pytest

from backend.settings import Settings, SettingsError

BASE = {"MLLM_MODEL": "some/model"}


def test_defaults_are_usable():
    settings = Settings.from_env(BASE)
    assert settings.mllm_device == "auto" and settings.basic_auth is None
    assert settings.prompts_dir.joinpath("box_label.txt").exists()


@pytest.mark.parametrize(
    "env, variable",
    [
        ({}, "MLLM_MODEL"),
        ({**BASE, "MLLM_DEVICE": "gpu0"}, "MLLM_DEVICE"),
        ({**BASE, "MLLM_BATCH_SIZE": "0"}, "MLLM_BATCH_SIZE"),
        ({**BASE, "MLLM_BATCH_SIZE": "many"}, "MLLM_BATCH_SIZE"),
        ({**BASE, "LABEL_STUDIO_URL": "localhost:8080"}, "LABEL_STUDIO_URL"),
        ({**BASE, "BASIC_AUTH_USER": "only-user"}, "BASIC_AUTH_PASS"),
        ({**BASE, "PROMPTS_DIR": "/no/such/dir"}, "PROMPTS_DIR"),
        ({**BASE, "ALLOWED_MEDIA_HOSTS": "http://cdn.example.com/x"}, "ALLOWED_MEDIA_HOSTS"),
        ({**BASE, "TAG_THRESHOLD": "1.5"}, "TAG_THRESHOLD"),
        ({**BASE, "SYNC_PROJECT_MODEL_VERSION": "maybe"}, "SYNC_PROJECT_MODEL_VERSION"),
        ({**BASE, "LOG_LEVEL": "loud"}, "LOG_LEVEL"),
        ({**BASE, "MLLM_PROVIDER": "anthropic"}, "MLLM_PROVIDER"),
        ({**BASE, "MLLM_PROVIDER": "openai"}, "OPENAI_BASE_URL"),
        ({**BASE, "MLLM_PROVIDER": "openai", "OPENAI_BASE_URL": "vllm:8000"}, "OPENAI_BASE_URL"),
        ({**BASE, "MLLM_QUANTIZATION": "3bit"}, "MLLM_QUANTIZATION"),
        ({**BASE, "MLLM_OPTION_SCORING": "max"}, "MLLM_OPTION_SCORING"),
        ({**BASE, "OPENAI_SAMPLES": "0"}, "OPENAI_SAMPLES"),
        ({**BASE, "CRITIC": "sometimes"}, "CRITIC"),
        ({**BASE, "CRITIC_MODEL": "judge", "CRITIC_PROVIDER": "openai"}, "CRITIC_BASE_URL"),
        ({**BASE, "CALIBRATION_MIN_REVIEWS": "1"}, "CALIBRATION_MIN_REVIEWS"),
        ({**BASE, "REDIS_URL": "localhost:6379"}, "REDIS_URL"),
        ({**BASE, "TRAINING_EPOCHS": "0"}, "TRAINING_EPOCHS"),
    ],
)
def test_a_wrong_value_names_the_variable_and_the_fix(env, variable):
    with pytest.raises(SettingsError, match=variable) as error:
        Settings.from_env(env)
    assert "set" in str(error.value)


def test_secrets_stay_out_of_the_repr():
    settings = Settings.from_env(
        {
            **BASE,
            "LABEL_STUDIO_URL": "http://ls:8080",
            "LABEL_STUDIO_API_KEY": "key-123",
            "BASIC_AUTH_USER": "u",
            "BASIC_AUTH_PASS": "pw-456",
        }
    )
    assert "key-123" not in repr(settings) and "pw-456" not in repr(settings)
    assert settings.basic_auth == ("u", "pw-456")


def test_allowed_hosts_are_normalised():
    settings = Settings.from_env({**BASE, "ALLOWED_MEDIA_HOSTS": " CDN.example.com , 10.0.0.5:8000,"})
    assert settings.allowed_media_hosts == ("cdn.example.com", "10.0.0.5:8000")
