"""What the first GPU run tripped over, checked on the CPU: the GPU check's device selection, random
initialisation of the `paper` preset from the config, and decoding with the transformers releases
that name GPT-2's KV cache `past_key_values` instead of `cache`."""
import dataclasses
from typing import Optional

import pytest
import torch
import transformers.modeling_outputs

from benchmarks import gpu_check
from configs.schema import ConfigError, load_config, model_config
from genloc import LocationModel, LocationModelConfig


# ------------------------------------------------------------------------------ gpu_check device
class _Started(Exception):
    """Raised by the patched `run` with the device `main` chose."""


@pytest.mark.parametrize("name, index", [("cuda", 0), ("cuda:1", 1)])
def test_gpu_check_selects_a_cuda_device_with_or_without_index(monkeypatch, name, index):
    """torch.cuda.set_device refuses `torch.device("cuda")`; the check must pass it an index."""
    selected = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_setDevice", selected.append, raising=False)

    def run(args, device):
        raise _Started(device)

    monkeypatch.setattr(gpu_check, "run", run)
    with pytest.raises(_Started) as started:
        gpu_check.main(["--device", name])
    assert started.value.args[0] == torch.device("cuda", index)
    assert selected == [index]


# ------------------------------------------------------------------------------ random init
def test_pretrained_false_drops_every_preset_weight_and_conflicts_are_errors():
    paper = LocationModelConfig.preset("paper")
    assert paper.pretrained and paper.vit_weights and paper.clip_weights and paper.gpt2_weights
    scratch = LocationModelConfig.preset("paper", pretrained=False)
    assert (scratch.vit_weights, scratch.clip_weights, scratch.gpt2_weights) == (None, None, None)
    assert dataclasses.replace(scratch, pretrained=True, vit_weights=None) == dataclasses.replace(paper, vit_weights=None,
                                                                                                   clip_weights=None,
                                                                                                   gpt2_weights=None)
    assert not LocationModelConfig.preset("tiny").pretrained
    assert LocationModelConfig.preset("tiny", gpt2_weights="/some/folder").pretrained  # a weight asks for loading
    with pytest.raises(ValueError, match=r"pretrained=False .* \['gpt2_weights'\] set"):
        LocationModelConfig.preset("paper", pretrained=False, gpt2_weights="openai-community/gpt2")
    with pytest.raises(ConfigError, match="model.*pretrained=False"):
        model_config(load_config(["model=paper", "model.pretrained=false", "model.vit_weights=x"]))


def test_configs_saved_before_the_pretrained_field_still_load():
    saved = LocationModelConfig.preset("paper").to_dict()
    del saved["pretrained"]
    assert LocationModelConfig.from_dict(saved) == LocationModelConfig.preset("paper")
    tiny = LocationModelConfig.preset("tiny").to_dict()
    del tiny["pretrained"]
    assert LocationModelConfig.from_dict(tiny).vit_weights is None


def test_paper_preset_with_pretrained_false_builds_from_the_command_line_offline(monkeypatch):
    """`model=paper model.pretrained=false` never looks for weights: the hub lookups are patched to fail."""
    def no_hub(*args, **kwargs):
        raise AssertionError("looked for pretrained weights")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("genloc.pretrained._cached_file", no_hub)
    cfg = model_config(load_config(["model=paper", "model.pretrained=false", "trainer=cpu"]))
    model = LocationModel(cfg)
    assert model.cfg.pretrained is False and model.prefix_len == 1 + 196
    assert model.decoder.config.n_layer == 12 and model.image_encoder.embed_dim == 768
    with pytest.raises(AssertionError, match="looked for pretrained weights"):
        LocationModel(model_config(load_config(["model=paper"])))


# ------------------------------------------------------------------------------ transformers cache name
@dataclasses.dataclass
class _OldOutput:
    """GPT-2's output as transformers 5.17 returns it: the KV cache under `past_key_values` (a plain
    dataclass: this release's ModelOutput would rename the field to `cache`)."""

    logits: Optional[torch.Tensor] = None
    past_key_values: Optional[object] = None


def _old_transformers_model(monkeypatch) -> LocationModel:
    """A tiny model whose decoder takes and returns its cache as `past_key_values` only."""
    monkeypatch.setattr(transformers.modeling_outputs, "CausalLMOutputWithCrossAttentions", _OldOutput)
    model = LocationModel(LocationModelConfig.preset("tiny")).eval()
    forward = model.decoder.forward

    def old_forward(*args, past_key_values=None, **kwargs):
        assert "cache" not in kwargs, "the old decoder has no `cache` argument"
        out = forward(*args, past_key_values=past_key_values, **kwargs)  # the name every release accepts
        return _OldOutput(logits=out.logits, past_key_values=out.past_key_values)

    monkeypatch.setattr(model.decoder, "forward", old_forward)
    return model


@pytest.mark.parametrize("cascade", [True, False])
def test_decoding_works_with_the_older_cache_name(monkeypatch, cascade):
    torch.manual_seed(0)
    new = LocationModel(LocationModelConfig.preset("tiny")).eval()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    expected = new.sample(images, ["car", "bird"], n=5, cascade=cascade, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    old = _old_transformers_model(monkeypatch)
    got = old.sample(images, ["car", "bird"], n=5, cascade=cascade, generator=torch.Generator().manual_seed(1))
    assert torch.equal(got.tokens, expected.tokens)
    prefix = old.build_prefix(old.encode_images(images), old.encode_texts(["car", "bird"]))
    tokens = got.tokens[:, 0]
    torch.testing.assert_close(old.box_log_probs_shared(prefix, torch.arange(2), tokens),
                               old.box_log_probs(prefix, tokens))


def test_attention_scale_of_a_release_without_the_attribute_is_the_same():
    """transformers 4.x computes GPT-2's score scale in the forward (no `attn.scaling`): the cascade
    decoder derives the same number from the same settings."""
    import types

    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

    from genloc.pretrained import attention_scaling

    for inverse in (False, True):
        attn = GPT2Attention(GPT2Config(n_embd=64, n_head=4, scale_attn_by_inverse_layer_idx=inverse), layer_idx=2)
        old = types.SimpleNamespace(head_dim=attn.head_dim, scale_attn_weights=attn.scale_attn_weights,
                                    scale_attn_by_inverse_layer_idx=inverse, layer_idx=2)
        assert attention_scaling(attn) == attn.scaling
        assert attention_scaling(old) == pytest.approx(attn.scaling, rel=1e-12)


# ------------------------------------------------------------------------------ dependency floors
def test_an_old_release_is_one_line_at_import(monkeypatch):
    from genloc import versions

    monkeypatch.setattr(versions, "version", lambda name: {"transformers": "4.55.4"}.get(name, "99.0"))
    with pytest.raises(ImportError) as error:
        versions.check()
    assert str(error.value) == ("genloc needs transformers>=4.56 (found 4.55.4): pip install 'transformers>=4.56'")
    monkeypatch.setattr(versions, "version", lambda name: versions.MINIMUM[name] + ".0+cu130")
    versions.check()  # the minimum itself, as a local CUDA build names it, passes


def test_pyproject_lower_bounds_are_the_checked_minimums():
    """genloc's floors are those of the base install, Lightning's that of the train extra."""
    import tomllib

    from tests.helpers import ROOT
    from genloc.versions import MINIMUM
    from lightning_modules import MINIMUM as TRAINING_MINIMUM

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lock = (ROOT / "requirements" / "lock.txt").read_text().splitlines()
    pinned = dict(line.split("==") for line in lock if "==" in line)
    for deps, minimum in ((project["dependencies"], MINIMUM), (project["optional-dependencies"]["train"], TRAINING_MINIMUM)):
        floors = {d.split(">=")[0]: d.split(">=")[1].split(",")[0] for d in deps if ">=" in d}
        assert {name: floors.get(name) for name in minimum} == minimum
        assert all(name in pinned for name in minimum)


# ------------------------------------------------------------------------------ bf16 sampling
def test_bf16_sampling_keeps_toy_tpr_fpr_within_seed_noise(tmp_path):
    """evaluate.py --bf16 on toy scenes: its TPR-FPR and plausible rate differ from fp32's by no
    more than fp32 differs from itself across three sampling seeds."""
    import evaluate
    from datamodules.toy import write_toy_split
    from genloc.checkpoint import save_model_checkpoint

    data = tmp_path / "toy-opa"
    write_toy_split(data, "toy-opa", "test", num_samples=24, seed=0, num_shards=1, progress=False)
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.ckpt"
    save_model_checkpoint(LocationModel(LocationModelConfig.preset("tiny", num_bins=32)), ckpt)

    def run(seed, *extra):
        doc = evaluate.main(["--model", str(ckpt), "--data", str(data), "--split", "test", "--num-samples", "50",
                             "--seed", str(seed), "--device", "cpu", "--no-progress",
                             "--out", str(tmp_path / f"{seed}{''.join(extra)}"), *extra])
        metrics = doc["metrics"]
        return {"tpr_fpr": metrics["tpr@50"] - metrics["fpr@50"], "plausible": doc["plausible_rate"]}

    fp32 = [run(seed) for seed in (0, 1, 2)]
    bf16 = run(0, "--bf16")
    for name in ("tpr_fpr", "plausible"):
        values = [r[name] for r in fp32]
        assert min(values) - (max(values) - min(values)) <= bf16[name] <= max(values) + (max(values) - min(values)), \
            (name, bf16[name], values)


# ------------------------------------------------------------------------------ fused attention
def test_vit_and_gpt2_attend_through_sdpa_without_masks_where_none_is_needed(monkeypatch):
    """Every ViT and GPT-2 attention goes through torch's SDPA; the ViT and the prefix pass give it no
    mask (flash-eligible). The box tokens' pass needs one: 4 queries after the cached prefix."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = LocationModel(LocationModelConfig.preset("tiny"))
    assert model.decoder.config._attn_implementation == "sdpa"
    assert all(block.attn.fused_attn for block in model.image_encoder.blocks)
    images = torch.rand(2, 3, 64, 64)
    texts = model.encode_texts(["car", "bird"])  # the frozen text tower is encoded once and cached
    calls, sdpa = [], F.scaled_dot_product_attention

    def record(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        calls.append((q.shape[-2], k.shape[-2], attn_mask is None, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", record)
    prefix = model.build_prefix(model.encode_images(images), texts)
    tokens = model.tokenizer.encode(torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.2, 0.2, 0.6, 0.7]]))
    model.box_log_probs_shared(prefix, torch.arange(2), tokens)
    vit, gpt2 = model.image_encoder.blocks, model.cfg.gpt2_n_layer
    plen, vit_tokens = model.prefix_len, model.num_image_tokens + model.image_encoder.num_prefix_tokens
    assert calls[:len(vit)] == [(vit_tokens, vit_tokens, True, False)] * len(vit)
    assert calls[len(vit):len(vit) + gpt2] == [(plen, plen, True, True)] * gpt2
    assert calls[len(vit) + gpt2:] == [(4, plen + 4, False, False)] * gpt2


# ------------------------------------------------------------------------------ FLOPs per sample
@pytest.mark.parametrize("preset, overrides, batch", [("tiny", {}, 4), ("tiny", {"freeze_image_encoder": False}, 4),
                                                      ("paper", {"pretrained": False}, 1)])
def test_training_flops_from_the_config_match_flop_counter(preset, overrides, batch):
    """The formula against torch's FlopCounterMode over a real MLE step (forward + backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.dpo_step import OPTIM, make_batch
    from lightning_modules.mle import MLEModule
    from genloc.flops import training_flops_per_sample

    cfg = LocationModelConfig.preset(preset, **overrides)
    torch.manual_seed(0)
    module = MLEModule(model_config=cfg.to_dict(), optim=OPTIM).train()
    data = make_batch(batch, cfg.image_size)
    module.model.encode_texts(data["category"])  # cached, as after the first steps of a run
    with FlopCounterMode(display=False) as counter:
        module.box_nll(data)[1].backward()
    counted = counter.get_total_flops() / batch
    assert counted > 0
    assert abs(training_flops_per_sample(cfg) - counted) <= 0.1 * counted, (training_flops_per_sample(cfg), counted)


# ------------------------------------------------------------------------------ make smoke-gpu
def test_smoke_gpu_stops_at_once_without_cuda(monkeypatch, capsys):
    from scripts import smoke_gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(smoke_gpu, "write_scenes", lambda *a: pytest.fail("started without CUDA"))
    assert smoke_gpu.main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA device is visible" in err


def test_smoke_gpu_reports_a_failed_part_and_skips_what_depends_on_it(monkeypatch, capsys):
    from scripts import smoke_gpu

    def broken(*args):
        raise RuntimeError("no finite val/loss after 4 steps")

    monkeypatch.setattr(smoke_gpu, "write_scenes", lambda *a: "no scenes needed")
    monkeypatch.setattr(smoke_gpu, "train_part", broken)
    monkeypatch.setattr(smoke_gpu, "ddp_part", lambda *a: "2 ranks (not run)")
    assert smoke_gpu.main(["--device", "cpu", "--tiny"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  train      RuntimeError: no finite val/loss after 4 steps" in out
    assert "PASS  ddp        2 ranks (not run)" in out  # the DDP part does not depend on the train part
    assert "FAIL  evaluate   skipped: training failed" in out and "FAILED: train, evaluate, insert" in out


def test_smoke_gpu_ddp_part_names_what_the_resumed_run_changed():
    from scripts.smoke_gpu import checkpoint_differences

    def checkpoint(weight, moment):
        return {"state_dict": {"w": torch.tensor([1.0, weight]), "b": torch.zeros(2)},
                "optimizer_states": [{"state": {0: {"exp_avg": torch.tensor([moment])}}}]}

    assert checkpoint_differences(checkpoint(2.0, 0.5), checkpoint(2.0, 0.5)) is None
    assert checkpoint_differences(checkpoint(2.0, 0.5), checkpoint(2.25, 0.5)) == (
        "1 weight tensors (largest difference 0.25, first ['w']), 0 optimiser tensors")
    assert checkpoint_differences(checkpoint(2.0, 0.5), checkpoint(2.0, 0.0)).endswith("1 optimiser tensors")


@pytest.mark.slow
def test_smoke_gpu_cpu_rehearsal_runs_every_part(tmp_path):
    import subprocess
    import sys

    from tests.helpers import ROOT

    proc = subprocess.run([sys.executable, "-m", "scripts.smoke_gpu", "--device", "cpu", "--tiny", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for part in ("device", "toy scenes", "train", "evaluate", "insert", "ddp"):
        assert f"PASS  {part}" in proc.stdout
    assert "pre-empted at step 2 and resumed: weights and optimiser state equal" in proc.stdout
    assert "steps/s" in proc.stdout and "smoke-gpu: all parts passed" in proc.stdout
    assert (tmp_path / "runs" / "toy_pretrain" / "default" / "checkpoints" / "last.ckpt").is_file()
    assert list((tmp_path / "insert").glob("*_edit_*.png")) and (tmp_path / "eval" / "metrics.json").is_file()


# ------------------------------------------------------------------------------ CUDA-only switches
def test_tf32_switch_touches_nothing_without_cuda_and_follows_the_config_with_it(monkeypatch):
    from lightning_modules.process import use_tf32

    def state():
        return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32

    before = state()
    try:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, False
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        use_tf32(True)
        assert state() == (False, False)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        use_tf32(True)
        assert state() == (True, True)
        use_tf32(False)
        assert state() == (False, False)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    assert load_config([]).tf32 is True


def test_fused_adamw_only_where_every_parameter_is_on_cuda(monkeypatch):
    from lightning_modules.optim import AdamWCosine

    chosen = []

    class Recorder(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            chosen.append(kwargs.get("fused"))
            super().__init__(params, **{k: v for k, v in kwargs.items() if k != "fused"})

    monkeypatch.setattr(torch.optim, "AdamW", Recorder)
    layer = torch.nn.Linear(3, 2)
    AdamWCosine(fused=True).build(layer.named_parameters(), total_steps=10)
    assert chosen == [None]  # CPU parameters: torch's default implementation, as before the switch
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    AdamWCosine(fused=True).build(layer.named_parameters(), total_steps=10)
    AdamWCosine(fused=False).build(layer.named_parameters(), total_steps=10)
    assert chosen == [None, True, None]


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_bf16_mixed_fit_clips_the_fused_adamw_as_it_clips_the_unfused_one(monkeypatch, algorithm):
    """The first fit loop on a GPU stopped at its first step: Lightning's mixed-precision plugin refuses
    to clip gradients for any fused optimiser. The fused kernel runs on a CPU too, so the GPU's case is
    replayed here: the fused run trains, and the gradients its optimiser stepped with were clipped."""
    import lightning as L

    from lightning_modules import MLEModule, optim
    from tests.helpers.batches import OPTIM, toy_batches

    clip = 1e-3

    class StepGradients(L.Callback):
        """The gradients of each step after clipping (Lightning zeroes them at the next step's start)."""

        def __init__(self):
            self.grads = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.grads.append(torch.cat([p.grad.flatten() for p in pl_module.parameters() if p.grad is not None]))

    def fit(fused: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(optim, "fused_kernel_available", lambda params: fused)
        torch.manual_seed(0)
        module = MLEModule(model_config=LocationModelConfig.preset("tiny", num_bins=32).to_dict(), optim=OPTIM)
        record = StepGradients()
        trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=2, gradient_clip_val=clip,
                            gradient_clip_algorithm=algorithm, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            callbacks=[record])
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(toy_batches(4, 2), batch_size=None))
        assert trainer.optimizers[0].defaults.get("fused") is (True if fused else None)
        return record.grads

    unfused, fused = fit(False), fit(True)
    assert len(fused) == 2
    for grad in fused:
        size = grad.norm() if algorithm == "norm" else grad.abs().max()
        assert size <= clip * (1 + 1e-4)
    assert torch.allclose(fused[0], unfused[0])  # the first step's clipped gradients: same parameters


def test_smoke_gpu_into_a_used_out_trains_again_with_any_steps(tmp_path):
    """A second check into the same --out trains its own steps (was: 0 steps and PASS, or with other
    --steps a FAIL with resume advice on a healthy machine); the earlier run is kept beside it."""
    from genloc.checkpoint import read_checkpoint
    from scripts import smoke_gpu

    device = torch.device("cpu")
    args = smoke_gpu.parse_args(["--device", "cpu", "--tiny", "--steps", "2"])
    smoke_gpu.write_scenes(tmp_path / "data", args)
    for steps in (2, 2, 3):
        args.steps = steps
        detail, checkpoint = smoke_gpu.train_part(args, device, tmp_path / "data", tmp_path / "runs")
        assert detail.startswith(f"{steps} steps") and "steps/s" in detail, detail
        assert read_checkpoint(checkpoint)["global_step"] == steps
    assert sorted(p.name for p in (tmp_path / "runs" / "toy_pretrain").iterdir()) == [
        "default", "default.old-1", "default.old-2"]
