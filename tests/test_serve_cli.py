"""The real `diffrt serve` command as a user starts it: a process on a free port of 127.0.0.1."""
from __future__ import annotations

import httpx
import openai
from cli_runner import one_line_error, run_cli
from serve_helpers import b64_pixels, serve_process


def test_diffrt_serve_digits_answers_the_openai_client_with_the_key_from_the_environment(tmp_path):
    with serve_process("digits", "--output-dir", str(tmp_path / "images"), DIFFRT_API_KEY="sk-env") as (base_url, _):
        client = openai.OpenAI(api_key="sk-env", base_url=f"{base_url}/v1", max_retries=0)
        result = client.images.generate(model="digits", prompt="a handwritten six", size="32x32",
                                        extra_body={"seed": 1, "steps": 4})
        assert httpx.get(result.data[0].url).status_code == 200
        assert [p.suffix for p in (tmp_path / "images").iterdir()] == [".png"]  # url images: there, nowhere else
        b64 = client.images.generate(prompt="a handwritten six", size="32x32", response_format="b64_json",
                                     extra_body={"seed": 1, "steps": 4})  # no model: the first package
        assert b64_pixels(b64.data[0].b64_json).shape == (32, 32, 3)
        assert httpx.get(f"{base_url}/v1/models").status_code == 401


def test_diffrt_serve_refuses_a_missing_package_in_one_line(tmp_path):
    result = run_cli("serve", str(tmp_path / "nothing-here"), "--port", "1", timeout=120)
    assert result.returncode != 0
    one_line_error(result.stderr, "serve", "nothing-here")


def test_diffrt_serve_refuses_bad_options_before_loading(tmp_path):
    result = run_cli("serve", "digits", "--max-batch", "0")
    assert result.returncode == 2
    one_line_error(result.stderr, "serve", "--max-batch")


def test_diffrt_serve_refuses_a_lora_dir_that_is_no_folder(tmp_path):
    result = run_cli("serve", "digits", "--lora-dir", str(tmp_path / "no-such-folder"), "--port", "1")
    assert result.returncode != 0
    one_line_error(result.stderr, "serve", "--lora-dir", "no-such-folder", "not a folder")


def test_diffrt_serve_with_provider_trt_needs_tensorrt_and_says_so_before_loading():
    # LoRA on "trt" goes through TensorRT refit (tests/test_tensorrt_build.py checks the plans' refit flag first)
    result = run_cli("serve", "digits", "--provider", "trt", "--port", "1")
    assert result.returncode != 0
    one_line_error(result.stderr, "serve", "provider 'trt'", "tensorrt")


def test_diffrt_serve_help_lists_the_service_options():
    result = run_cli("serve", "--help")
    assert result.returncode == 0
    for option in ("--api-key", "--max-batch", "--batch-wait-ms", "--max-queue", "--max-pixels", "--max-steps",
                   "--max-images", "--timeout", "--output-dir", "--lora-dir", "--lora-cache", "--ray", "--replicas"):
        assert option in result.stdout


def test_the_server_process_carries_no_torch_transformers_or_diffusers():
    import subprocess
    import sys

    from cli_runner import cli_env

    code = ("import sys\nfrom diffrt.serve.app import create_app\nfrom diffrt.serve.config import ServeConfig\n"
            "create_app(ServeConfig(packages=['digits']))\n"
            "print(','.join(m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
