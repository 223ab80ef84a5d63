"""Model folders (docs/design/placement.md#model-folders): export -> from_pretrained round trip in a fresh process, folder contents,
model card, offline Hub ids, pushing, weight sources that must not be fetched again."""
import json
import logging
import os
import re
import socket
import subprocess
import sys

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader

from genloc.hub import load_location_model
from lightning_modules.mle import MLEModule
from genloc import GenLocModel, LocationModel, LocationModelConfig, ModelFilesError
from genloc.hub import FILES, INSTALL, VERSION_KEY, card_metrics, portable_config
from scripts import export as export_script
from tests.helpers import FIXTURES, ROOT

PHOTO = FIXTURES / "libcom" / "controllable_composition" / "background" / "000000460450.png"
METRICS = {"train/loss": 3.21, "val/loss": 3.5, "val/plausible_rate": 0.25, "val/tpr@10": 0.1, "val/tpr@100": 0.4,
           "val/fpr@100": 0.05, "lr-AdamW/pg1": 0.001}
OPTIM = dict(lr=1e-3, weight_decay=0.01, betas=[0.9, 0.95], warmup_steps=1, min_lr_ratio=0.1)


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(2, 3, 64, 64, generator=g), "category": ["car", "bird"],
            "size": torch.tensor([[64, 64]] * 2), "key": [f"k{seed}-0", f"k{seed}-1"], "meta": [{}, {}],
            "positives": [torch.tensor([[0.1, 0.5, 0.4, 0.8]]), torch.tensor([[0.2, 0.1, 0.3, 0.2]])],
            "negatives": [torch.zeros(0, 4), torch.zeros(0, 4)]}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real Lightning checkpoint (2 MLE steps, relative extents) in a run folder with config.yaml
    and metrics.json, as train.py writes them; returns (checkpoint path, the trained module)."""
    run_dir = tmp_path_factory.mktemp("runs") / "toy_finetune" / "default"
    L.seed_everything(0)
    module = MLEModule(model_config=LocationModelConfig.preset("tiny", relative_extents=True).to_dict(), optim=OPTIM)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False,
                        callbacks=[ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True)])
    trainer.fit(module, train_dataloaders=DataLoader([_batch(i) for i in range(2)], batch_size=None,
                                                     collate_fn=lambda b: b))
    OmegaConf.save(OmegaConf.create({"experiment": "toy_finetune", "stage": "mle", "init_from": None,
                                     "data": {"data_dir": "data/toy/toy-opa"}, "trainer": {"max_steps": 2}}),
                   run_dir / "config.yaml")
    (run_dir / "metrics.json").write_text(json.dumps(METRICS))
    return run_dir / "checkpoints" / "last.ckpt", module


@pytest.fixture(scope="module")
def folder(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "toy_model"
    assert export_script.main(["--model", str(run[0]), "--out", str(out)]) == 0
    return out


def _inputs():
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5)), ["car", "person"]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


ROUND_TRIP = """
import sys, torch
from genloc import GenLocModel
model = GenLocModel.from_pretrained(sys.argv[1])
images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
out = model.sample(images, ["car", "person"], n=30, temperature=1.3, top_p=0.95,
                   generator=torch.Generator().manual_seed(3), size=torch.tensor([0.1, 0.5, 0.1, 0.5]))
torch.save({"tokens": out.tokens, "log_probs": out.log_probs, "lightning": "lightning" in sys.modules,
            "omegaconf": "omegaconf" in sys.modules}, sys.argv[2])
"""


@pytest.mark.slow
def test_round_trip_in_a_fresh_process_gives_the_checkpoints_boxes_exactly(run, folder, tmp_path):
    result = tmp_path / "result.pt"
    proc = subprocess.run([sys.executable, "-c", ROUND_TRIP, str(folder), str(result)], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "No pretrained weights loaded" not in proc.stderr + proc.stdout
    got = torch.load(result)
    assert not got["lightning"] and not got["omegaconf"]  # loading needs neither Lightning nor the training config
    images, categories = _inputs()
    kwargs = dict(n=30, temperature=1.3, top_p=0.95, size=torch.tensor([0.1, 0.5, 0.1, 0.5]))
    trained = run[1].model.eval()
    for model in (trained, load_location_model(run[0])):
        ref = model.sample(images, categories, generator=torch.Generator().manual_seed(3), **kwargs)
        assert torch.equal(ref.tokens, got["tokens"]) and torch.equal(ref.log_probs, got["log_probs"])


def test_folder_holds_only_the_listed_files_with_a_portable_config(folder, run):
    import genloc

    assert sorted(os.listdir(folder)) == sorted(FILES)
    config = json.loads((folder / "config.json").read_text())
    assert config.pop(VERSION_KEY) == genloc.__version__  # the release that wrote the folder
    assert config["vit_weights"] is None and config["clip_weights"] is None and config["gpt2_weights"] is None
    assert LocationModelConfig.from_dict(config) == portable_config(run[1].model.cfg)
    assert config["relative_extents"] is True
    loaded = GenLocModel.from_pretrained(folder)
    for key, value in run[1].model.state_dict().items():  # every weight, frozen encoders included
        assert torch.equal(loaded.state_dict()[key], value), key


def test_model_card_names_the_run_and_its_metrics_and_its_snippet_runs_as_written(folder, tmp_path):
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n")
    assert "arxiv.org/abs/2410.13564" in card and "Apache-2.0" in card and "preset: `tiny`" in card
    assert "| 1 | `toy_finetune` | MLE | `data/toy/toy-opa` | 2 |" in card
    shown = card_metrics(METRICS)
    assert set(shown) == {"train/loss", "val/loss", "val/plausible_rate", "val/tpr@100", "val/fpr@100"}
    for key, value in shown.items():
        assert f"| `{key}` | {value:.4f} |" in card
    assert "val/tpr@10`" not in card and "lr-AdamW" not in card
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert snippet.startswith(f"# {INSTALL}\nfrom genloc import ")  # the install line first
    assert f"GenLocModel.from_pretrained({str(folder)!r})" in snippet
    Image.open(PHOTO).convert("RGB").save(tmp_path / "photo.jpg")
    proc = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("tensor(") >= 3  # boxes, log-probs, the group's boxes


def test_offline_hub_id_not_cached_is_one_clear_error_without_network(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    connects = []
    monkeypatch.setattr(socket.socket, "connect", lambda self, addr: connects.append(addr))
    with pytest.raises(ModelFilesError) as info:
        GenLocModel.from_pretrained("someone/genloc-toy")
    assert "'someone/genloc-toy'" in str(info.value) and "HF_HUB_OFFLINE" in str(info.value)
    assert connects == []
    with pytest.raises(ModelFilesError, match="not a GenLoc model folder: config.json, model.safetensors missing"):
        GenLocModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "garbled"])
def test_a_damaged_weights_file_is_named_as_damaged_not_as_a_config_mismatch(folder, tmp_path, damage):
    copy = tmp_path / "model"
    copy.mkdir()
    for name in FILES:
        (copy / name).write_bytes((folder / name).read_bytes())
    weights = (folder / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(weights[: len(weights) // 2] if damage == "truncated"
                                             else b"\xff" * 64 + weights[64:])
    with pytest.raises(ModelFilesError) as info:
        GenLocModel.from_pretrained(copy)
    message = str(info.value)
    assert "model.safetensors is damaged or truncated" in message and "do not fit" not in message
    assert len(message.splitlines()) == 1


def test_weights_of_another_architecture_are_named_as_a_config_mismatch(folder, tmp_path):
    copy = tmp_path / "model"
    copy.mkdir()
    for name in FILES:
        (copy / name).write_bytes((folder / name).read_bytes())
    config = json.loads((copy / "config.json").read_text())
    config["gpt2_n_layer"] += 1
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFilesError, match=r"model\.safetensors: weights do not fit .*config\.json"):
        GenLocModel.from_pretrained(copy)


def test_hub_id_loads_from_the_hub_cache_offline(folder, tmp_path, monkeypatch):
    """The hub cache layout huggingface_hub reads: refs/main -> snapshots/<commit>/<files>."""
    import huggingface_hub.constants

    repo = tmp_path / "models--someone--genloc-toy"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    for name in FILES:
        (repo / "snapshots" / commit / name).write_bytes((folder / name).read_bytes())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    from_hub = GenLocModel.from_pretrained("someone/genloc-toy")
    local = GenLocModel.from_pretrained(folder)
    images, categories = _inputs()
    a = from_hub.sample(images, categories, n=10, generator=torch.Generator().manual_seed(0))
    b = local.sample(images, categories, n=10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.log_probs, b.log_probs)


def test_no_random_init_warning_when_weights_come_from_a_file(run, folder, caplog):
    with caplog.at_level(logging.WARNING):
        LocationModel(LocationModelConfig.preset("tiny"))
    assert any("No pretrained weights loaded" in r.getMessage() for r in caplog.records)  # the warning exists
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_location_model(run[0])
        GenLocModel.from_pretrained(folder)
    assert not [r for r in caplog.records if "No pretrained weights loaded" in r.getMessage()]


def test_weight_sources_are_not_fetched_again_and_extra_positions_are_dropped(tmp_path):
    """A GPT-2 from a local folder (1024 positions, as pretrained GPT-2 has) is exported, the folder
    deleted, and the model folder still loads and samples exactly as the original model."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=1024, n_embd=128, n_layer=3, n_head=4))
    gpt2.save_pretrained(tmp_path / "gpt2")
    cfg = LocationModelConfig.preset("tiny", gpt2_weights=str(tmp_path / "gpt2"))
    model = LocationModel(cfg).eval()
    assert model.decoder.transformer.wpe.weight.shape[0] == 1024
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"hyper_parameters": {"model_config": cfg.to_dict()},
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    assert export_script.main(["--model", str(ckpt), "--out", str(tmp_path / "m")]) == 0
    for f in (tmp_path / "gpt2").iterdir():
        f.unlink()
    (tmp_path / "gpt2").rmdir()
    loaded = GenLocModel.from_pretrained(tmp_path / "m")
    assert loaded.cfg.gpt2_weights is None and loaded.decoder.transformer.wpe.weight.shape[0] == model.prefix_len + 5
    images, categories = _inputs()
    a = model.sample(images, categories, n=20, generator=torch.Generator().manual_seed(1))
    b = loaded.sample(images, categories, n=20, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.log_probs, b.log_probs, atol=1e-6, rtol=0)


def test_portable_config_keeps_what_the_hub_weights_decide_about_the_architecture():
    paper = portable_config(LocationModelConfig.preset("paper"))
    assert (paper.vit_weights, paper.clip_weights, paper.gpt2_weights) == (None, None, None)
    assert paper.vit == "vit_base_patch16_224.augreg2_in21k_ft_in1k"   # the tag's mean/std
    assert paper.clip_model == "ViT-B-32-quickgelu"                     # openai weights use QuickGELU
    tiny = LocationModelConfig.preset("tiny")
    assert portable_config(tiny) == tiny


def test_export_bad_input_exits_2_with_one_line(run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        export_script.main(["--model", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "m")])
    assert exc.value.code == 2 and "nope.ckpt not found" in capsys.readouterr().err
    (tmp_path / "corrupt.ckpt").write_bytes(b"not a checkpoint")
    assert export_script.main(["--model", str(tmp_path / "corrupt.ckpt"), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "corrupt.ckpt is corrupt or unreadable" in err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert export_script.main(["--model", str(run[0]), "--out", str(tmp_path / "busy")]) == 2
    assert "is not a model folder" in capsys.readouterr().err
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".*partial"))


@pytest.mark.parametrize("out", [".", ".."])
def test_export_to_the_current_or_parent_folder_is_one_line(out, run, tmp_path, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")
    assert export_script.main(["--model", str(run[0]), "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "name the model folder" in err
    assert not list((tmp_path / "empty").iterdir()) and not list(tmp_path.glob(".*partial"))


def test_export_replaces_an_earlier_export_and_pushes_the_folder(run, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    out = tmp_path / "m"
    assert export_script.main(["--model", str(run[0]), "--out", str(out)]) == 0
    first = (out / "model.safetensors").read_bytes()
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, exist_ok):
            calls.append(("create", repo_id, exist_ok))
            return type("Repo", (), {"repo_id": repo_id})()

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls.append(("upload", sorted(os.listdir(folder_path)), repo_id))
            return "https://huggingface.co/someone/genloc-toy/commit/1"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert export_script.main(["--model", str(run[0]), "--out", str(out), "--push-to-hub", "someone/genloc-toy"]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err and calls == []  # offline: no push, folder written
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    assert export_script.main(["--model", str(run[0]), "--out", str(out), "--push-to-hub", "someone/genloc-toy"]) == 0
    assert calls == [("create", "someone/genloc-toy", True), ("upload", sorted(FILES), "someone/genloc-toy")]
    assert sorted(os.listdir(out)) == sorted(FILES) and (out / "model.safetensors").read_bytes() == first
    assert "GenLocModel.from_pretrained('someone/genloc-toy')" in (out / "README.md").read_text()


def test_card_adds_the_evaluation_metrics_of_evaluate_py(run, tmp_path, capsys):
    doc = {"ns": [10, 100], "metrics": {"tpr@10": 0.2, "tpr@100": 0.61, "fpr@100": 0.07, "tpr_shared@100": 0.3,
                                        "fpr_shared@100": 0.035}, "plausible_rate": 0.85}
    (tmp_path / "eval.json").write_text(json.dumps(doc))
    out = tmp_path / "m"
    assert export_script.main(["--model", str(run[0]), "--out", str(out), "--eval", str(tmp_path / "eval.json")]) == 0
    card = (out / "README.md").read_text()
    for key, value in [("eval/tpr@100", 0.61), ("eval/fpr@100", 0.07), ("eval/plausible_rate", 0.85),
                       ("val/loss", 3.5)]:
        assert f"| `{key}` | {value:.4f} |" in card
    assert f"`{tmp_path / 'eval.json'}`" in card and "eval/tpr@10`" not in card
    (tmp_path / "bad.json").write_text("{}")
    assert export_script.main(["--model", str(run[0]), "--out", str(out), "--eval", str(tmp_path / "bad.json")]) == 2
    assert "not a metrics.json written by evaluate.py" in capsys.readouterr().err


def test_model_card_follows_the_stages_back_through_init_from_and_the_reference(tmp_path):
    """The card's training table comes from each run's config.yaml: DPO -> its reference -> init_from."""
    from omegaconf import OmegaConf

    from configs.schema import load_config
    from scripts.export import run_info

    def run(name, extra):
        cfg = load_config([f"experiment={name}", f"log_root={tmp_path}"] + extra)
        folder = tmp_path / name / "default"
        (folder / "checkpoints").mkdir(parents=True)
        OmegaConf.save(cfg, folder / "config.yaml")
        return folder / "checkpoints" / "last.ckpt"

    run("toy_pretrain", [])
    run("toy_finetune", [])
    dpo = run("toy_dpo", [])
    stages = run_info(dpo, None)["stages"]
    assert [s["experiment"] for s in stages] == ["toy_pretrain", "toy_finetune", "toy_dpo"]
    assert [s["objective"].split(" ")[0] for s in stages] == ["MLE", "MLE", "DPO"]
    assert stages[-1]["objective"] == "DPO (beta 0.2, sft_weight 1.0)"


def test_model_card_carries_hub_metadata(folder):
    from huggingface_hub import ModelCard

    data = ModelCard.load(folder / "README.md").data
    assert data.library_name == "genloc" and data.license == "apache-2.0"
    assert data.pipeline_tag == "object-detection"
    assert {"object-placement", "object-insertion", "pytorch_model_hub_mixin"} <= set(data.tags)
    assert data.datasets == ["toy-opa"]  # the training stage's data folder
    assert data.base_model is None  # the tiny model starts from random weights


def test_base_model_names_the_pretrained_weights_and_survives_export_and_reload(tmp_path, monkeypatch):
    from huggingface_hub import ModelCard

    from genloc.hub import base_models, model_card, model_from_state_dict

    assert base_models(LocationModelConfig.preset("paper")) == [
        "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k", "timm/vit_base_patch32_clip_224.openai",
        "openai-community/gpt2"]
    assert base_models(LocationModelConfig.preset("tiny", gpt2_weights=str(tmp_path))) == []  # a local file: no id
    # a tiny model "trained" from a timm tag and a Hub GPT-2 (its weights come from the state dict: nothing fetched)
    cfg = LocationModelConfig.preset("tiny", vit_weights="augreg_in21k_ft_in1k", gpt2_weights="openai-community/gpt2")
    state = GenLocModel(portable_config(cfg)).state_dict()
    model = model_from_state_dict(cfg, state, "test")
    expected = ["timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k", "openai-community/gpt2"]
    model.save_pretrained(tmp_path / "m", model_card_kwargs={"model_id": "me/m", "repo_url": "https://example.org/genloc"})
    card = ModelCard.load(tmp_path / "m" / "README.md")
    assert card.data.base_model == expected
    assert "https://example.org/genloc" in card.text
    again = GenLocModel.from_pretrained(tmp_path / "m")
    assert again.base_models == expected  # a folder exported again keeps its base_model
    monkeypatch.setattr("genloc.hub.repository_url", lambda: None)
    assert "code:" not in model_card(cfg, "me/m")  # no repository named, none invented
    monkeypatch.setattr("genloc.hub.repository_url", lambda: "https://example.org/installed")
    assert "- code: https://example.org/installed" in model_card(cfg, "me/m")  # pyproject's [project.urls]


def test_from_pretrained_takes_the_mixin_keywords_and_passes_them_to_the_hub(folder, monkeypatch):
    import inspect

    import huggingface_hub
    from huggingface_hub import ModelHubMixin

    standard = {name for name, p in inspect.signature(ModelHubMixin.from_pretrained).parameters.items()
                if p.kind is p.KEYWORD_ONLY}
    assert {"force_download", "revision", "cache_dir", "token", "local_files_only"} <= standard
    named = set(inspect.signature(GenLocModel.from_pretrained).parameters)
    # the rest (proxies, resume_download before huggingface_hub 1.0) go on to hf_hub_download
    assert standard - named <= set(inspect.signature(huggingface_hub.hf_hub_download).parameters)
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs))
        return str(folder / filename)

    fake_download.__signature__ = inspect.signature(huggingface_hub.hf_hub_download)  # the keywords it takes
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr("genloc.hub.hub_offline", lambda: False)
    values = {"force_download": True, "revision": "v1", "cache_dir": "/somewhere", "token": "hf_x",
              "local_files_only": True}
    GenLocModel.from_pretrained("someone/genloc-toy", **values)
    assert [c[:2] for c in calls] == [("someone/genloc-toy", "config.json"), ("someone/genloc-toy", "model.safetensors")]
    for _, _, kwargs in calls:
        assert {k: kwargs.get(k) for k in values} == values
    calls.clear()
    GenLocModel.from_pretrained(folder, **values)  # a folder: nothing to download, the keywords are accepted
    assert calls == []
    GenLocModel.from_pretrained("someone/genloc-toy", etag_timeout=3)  # any keyword of hf_hub_download
    assert calls[-1][2]["etag_timeout"] == 3
    with pytest.raises(TypeError, match="no_such_keyword"):
        GenLocModel.from_pretrained(folder, no_such_keyword=1)
