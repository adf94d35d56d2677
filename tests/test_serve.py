"""What export.py writes serves as a chat model: `transformers serve` (an OpenAI-compatible server, README's "Serving
a chat model") answers the official openai client, streamed and not, as `sample.py --chat --temperature 0` does.

Slow, opt-in (`python -m pytest -m slow`): most of its time trains the model and starts the server (which spawns a
process for the model and listens once it is loaded)."""

import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import export
import sample
import train

# The conversations of README's example: whatever the user asks first, "Yes."; whatever next, "No, thanks."
CONVERSATIONS = [{"messages": [
    {"role": "user", "content": f"Is {n} a number?"}, {"role": "assistant", "content": "Yes."},
    {"role": "user", "content": f"Do you want {n} more?"}, {"role": "assistant", "content": "No, thanks."}]}
    for n in range(64)]
TURNS = ["Is 7 a number?", "Do you want 7 more?"]
MAX_TOKENS = 16  # both sides cut a reply there, so that they compare even if one does not end


def free_port():
    """A port nobody listens on now (the OS's pick), on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(server, port, log, timeout=300):
    """Poll GET /health until the server answers 200 (it listens only once the model is loaded), it exits, or the
    timeout passes. http.client, not urllib: no proxy from the environment can come between."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"transformers serve exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass  # not listening yet
        finally:
            connection.close()
        time.sleep(0.5)
    pytest.fail(f"transformers serve did not answer /health within {timeout} s:\n{log.read_text()[-3000:]}")


def stop(server):
    """SIGTERM to the server's process group (its model's process and multiprocessing's tracker with it), SIGKILL
    if it has not exited 30 s later: no test leaves a server behind."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=30)
            return
        except subprocess.TimeoutExpired:
            pass


def served_replies(client, model, stream):
    """The server's greedy replies to TURNS, as one conversation: each turn sent with the replies so far."""
    messages, replies = [], []
    for turn in TURNS:
        messages.append({"role": "user", "content": turn})
        # temperature 0: the server decodes greedily (do_sample=False), whatever the model's generation config
        response = client.chat.completions.create(model=model, messages=messages, temperature=0,
                                                  max_tokens=MAX_TOKENS, stream=stream)
        if stream:  # the first chunk carries only the role, the last only finish_reason: their content is None
            reply = "".join(chunk.choices[0].delta.content or "" for chunk in response if chunk.choices)
        else:
            reply = response.choices[0].message.content
        replies.append(reply)
        messages.append({"role": "assistant", "content": reply})
    return replies


@pytest.mark.slow
def test_transformers_serve_answers_the_openai_client_as_sample_chat_does_streamed_and_not(tmp_path, monkeypatch,
                                                                                          capsys):
    # in the test, not at import: the default run (`-m "not slow"`) deselects it without importing them
    for name in ("transformers", "fastapi", "uvicorn"):
        pytest.importorskip(name, reason=f"`transformers serve` needs {name}: pip install 'transformers[serving]'")
    openai = pytest.importorskip("openai", reason="the check asks with the official client: pip install openai")
    data = tmp_path / "yesno.json"
    data.write_text(json.dumps(CONVERSATIONS), encoding="utf-8")
    out, hf_dir = tmp_path / "out", tmp_path / "out" / "hf"
    # README's recipe, smaller and hotter for time (3.3M parameters, --max_lr 1e-2): it answers right after 30 steps
    # (loss 0.02; seeds 1 and 2 too) where README's gpt2-micro takes 200; float32, the dtype the server computes in
    train.main(["--dataset_type", "chat", "--dataset_path", str(data), "--out_dir", str(out), "--model", "gpt2-micro",
                "--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--seq_len", "64", "--batch_size", "8",
                "--max_steps", "30", "--optimizer", "adamw", "--max_lr", "1e-2", "--warmup_steps", "10",
                "--eval_interval", "30", "--sample_tokens", "0", "--device", "cpu", "--dtype", "float32"])
    export.main(["--init_from", str(out), "--out_dir", str(hf_dir)])

    port, log = free_port(), tmp_path / "serve.log"
    # the export named on the command line is preloaded (and the only model served); loopback only; offline: the
    # model is a local directory, nothing to look up on the Hub. A session of its own, so that stop() ends the
    # processes it spawns too.
    with open(log, "w") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-c", "from transformers.cli.transformers import main; main()", "serve", str(hf_dir),
             "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        # sample.py's replies while the server starts
        monkeypatch.setattr(sys, "stdin", io.StringIO("".join(turn + "\n" for turn in TURNS)))
        capsys.readouterr()
        sample.main(["--init_from", str(out), "--chat", "--temperature", "0", "--max_new_tokens", str(MAX_TOKENS),
                     "--device", "cpu", "--dtype", "float32"])
        sampled = capsys.readouterr().out.splitlines()
        assert sampled == ["Yes.", "No, thanks."]

        wait_until_healthy(server, port, log)
        # the served model's id is the path as given to `transformers serve`; trust_env=False: no proxy from the
        # environment between the client and the loopback
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=120, max_retries=0,
                           http_client=openai.DefaultHttpxClient(trust_env=False)) as client:
            assert [model.id for model in client.models.list()] == [str(hf_dir)]
            assert served_replies(client, str(hf_dir), stream=False) == sampled
            assert served_replies(client, str(hf_dir), stream=True) == sampled
    finally:
        stop(server)
