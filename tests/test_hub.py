"""push_to_hub against a local HTTP endpoint that speaks the Hub's upload protocol and records the files."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from conftest import assert_loads_identically, tiny_bert

from drt_peft import MagnitudeConfig, get_drt_model


class _RecordingHub(BaseHTTPRequestHandler):
    """The calls an upload makes: create the repo, validate the card's YAML, ask upload modes, commit files."""

    repos: dict[str, dict[str, bytes]]
    cards: list[str]

    def log_message(self, *args) -> None:
        pass

    def _reply(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        path = self.path.split("?")[0]
        if path == "/api/repos/create":
            request = json.loads(body)
            repo = f"{request['organization']}/{request['name']}"
            self.repos.setdefault(repo, {})
            return self._reply(200, {"url": f"http://127.0.0.1/{repo}", "name": repo})
        if path == "/api/validate-yaml":
            self.cards.append(json.loads(body)["content"])
            return self._reply(200, {"errors": [], "warnings": []})
        if path.startswith("/api/models/") and "/preupload/" in path:
            files = json.loads(body)["files"]
            return self._reply(
                200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        if path.startswith("/api/models/") and "/commit/" in path:
            repo = path[len("/api/models/") :].split("/commit/")[0]
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    self.repos[repo][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            return self._reply(200, {"commitUrl": f"http://127.0.0.1/{repo}/commit/1", "commitOid": "1" * 40})
        return self._reply(404, {"error": f"unexpected POST {path}"})


@pytest.fixture
def hub() -> Iterator[tuple[str, dict[str, dict[str, bytes]]]]:
    repos: dict[str, dict[str, bytes]] = {}
    handler = type("Handler", (_RecordingHub,), {"repos": repos, "cards": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", repos
    server.shutdown()
    server.server_close()


def test_push_to_hub_uploads_a_loadable_adapter(hub, tmp_path, bert_batch: dict) -> None:
    endpoint, repos = hub
    model = get_drt_model(tiny_bert(), MagnitudeConfig(density=0.1, modules_to_save=["classifier"]))
    with torch.no_grad():
        for _, layer in model.drt_layers():
            layer.drt_values.mul_(1.5)
    model.push_to_hub("team/tiny-adapter", endpoint=endpoint, token="hf_test")
    files = repos["team/tiny-adapter"]
    assert sorted(files) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    assert_loads_identically(model, tiny_bert(), tmp_path, {"input_ids": bert_batch["input_ids"]})
    assert b"library_name: drt_peft" in files["README.md"]
    assert (
        b'model = DRTModel.from_pretrained(base, "team/tiny-adapter")' in files["README.md"]
    )  # not the temporary folder
