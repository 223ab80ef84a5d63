"""Fast paths and GPU-style options, exercised on CPU with the tiny preset: the shared-prefix
teacher-forcing path equals the repeated-prefix reference (values and gradients); bf16 autocast
and gradient accumulation run through train.py; accumulating 2 batches is the update of one batch
twice the size; `compile_decoder` (torch.compile) matches eager."""
import lightning as L
import pytest
import torch

import train as train_script
from configs.schema import load_config
from lightning_modules.mle import MLEModule
from genloc import LocationModel, LocationModelConfig
from tests.helpers.runs import tiny_run_overrides

OPTIM = dict(lr=1e-3, weight_decay=0.01, betas=[0.9, 0.95], warmup_steps=1, min_lr_ratio=0.1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LocationModel(LocationModelConfig.preset("tiny"))


def _boxes(owner: torch.Tensor, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    lo = torch.rand(len(owner), 2, generator=gen) * 0.6
    return torch.cat([lo, lo + 0.1 + torch.rand(len(owner), 2, generator=gen) * 0.3], dim=1)


def _scores_and_grads(model, images, categories, owner, tokens, shared: bool):
    """Per-token log-probs, masked distribution and gradients (prefix + parameters) of a weighted loss."""
    model.zero_grad(set_to_none=True)
    prefix = model.build_prefix(model.encode_images(images), model.encode_texts(categories))
    prefix.retain_grad()
    if shared:
        logp, dist = model.box_log_probs_shared(prefix, owner, tokens, with_distribution=True)
    else:
        logp, dist = model.box_log_probs(prefix[owner], tokens, with_distribution=True)
    weights = torch.arange(1.0, logp.numel() + 1).view_as(logp)  # every token gets its own weight
    (-(logp * weights).mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logp.detach(), dist.detach(), prefix.grad.clone(), grads


def test_shared_prefix_equals_repeated_prefix(model):
    """Several boxes per image (unsorted owners, an image with one box, one with four)."""
    model.eval()  # dropout off: the paths differ only in where the prefix is computed
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    categories = ["dog", "cat", "car", "cup"]
    owner = torch.tensor([2, 0, 0, 3, 1, 3, 3, 0, 2, 3])
    tokens = model.tokenizer.encode(_boxes(owner))
    ref = _scores_and_grads(model, images, categories, owner, tokens, shared=False)
    new = _scores_and_grads(model, images, categories, owner, tokens, shared=True)
    torch.testing.assert_close(new[0], ref[0], atol=1e-5, rtol=1e-5)
    finite = torch.isfinite(ref[1])
    assert torch.equal(finite, torch.isfinite(new[1]))  # same validity masks
    torch.testing.assert_close(new[1][finite], ref[1][finite], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new[2], ref[2], atol=1e-7, rtol=1e-4)  # gradient through the KV cache
    assert ref[3].keys() == new[3].keys() and len(ref[3]) > 0
    for name in ref[3]:
        torch.testing.assert_close(new[3][name], ref[3][name], atol=1e-6, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_shared_prefix_rejects_bad_owner_and_invalid_boxes(model):
    prefix = torch.zeros(2, model.prefix_len, model.cfg.gpt2_n_embd)
    tokens = model.tokenizer.encode(_boxes(torch.zeros(3)))
    with pytest.raises(ValueError, match="owner indices"):
        model.box_log_probs_shared(prefix, torch.tensor([0, 1, 2]), tokens)
    with pytest.raises(ValueError, match="owner"):
        model.box_log_probs_shared(prefix, torch.tensor([0, 1]), tokens)
    with pytest.raises(ValueError, match="not a valid box"):
        model.box_log_probs_shared(prefix, torch.tensor([0, 1, 1]), torch.tensor([[5, 5, 5, 9]] * 3))


# ------------------------------------------------------------------------------ GPU-style options
def test_train_py_runs_bf16_mixed_with_gradient_accumulation(tiny_toy_data, tmp_path):
    """`trainer.precision=bf16-mixed` really autocasts the decoder; accumulation takes 2 batches a step."""
    dtypes = []

    class DecoderDtype(L.Callback):
        def on_fit_start(self, trainer, module):
            module.model.decoder.register_forward_hook(lambda mod, args, out: dtypes.append(out.logits.dtype))

    overrides = tiny_run_overrides(tiny_toy_data / "toy-opa", tmp_path, steps=2)
    cfg = load_config(["experiment=toy_finetune", "init_from=null", "trainer.precision=bf16-mixed",
                       "trainer.accumulate_grad_batches=2"] + overrides)
    result = train_script.train(cfg, extra_callbacks=[DecoderDtype()])
    trainer = result["trainer"]
    assert trainer.precision == "bf16-mixed" and trainer.accumulate_grad_batches == 2
    assert trainer.global_step == 2 and trainer.fit_loop.total_batch_idx + 1 == 4  # 2 batches per step
    assert torch.bfloat16 in dtypes
    assert torch.isfinite(torch.tensor(result["metrics"]["train/loss"]))


def _mle_batch(size: int, seed: int) -> dict:
    """Two positives per image, so every micro-batch holds the same number of boxes."""
    gen = torch.Generator().manual_seed(seed)
    owner = torch.arange(size).repeat_interleave(2)
    boxes = _boxes(owner, seed)
    return {"image": torch.rand(size, 3, 64, 64, generator=gen), "category": ["car", "bird", "lamp", "person"][:size],
            "positives": list(boxes.view(size, 2, 4)), "negatives": [torch.zeros(0, 4)] * size,
            "key": [f"s{seed}-{i}" for i in range(size)]}


def _one_step(batches: list[dict], accumulate: int) -> tuple[dict, dict]:
    """Gradients seen by the optimiser and parameters after one Trainer step."""
    torch.manual_seed(0)
    config = LocationModelConfig.preset("tiny", gpt2_dropout=0.0).to_dict()
    module = MLEModule(model_config=config, optim=OPTIM)
    grads = {}

    class Grads(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads.update({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})

    trainer = L.Trainer(accelerator="cpu", max_steps=1, accumulate_grad_batches=accumulate, gradient_clip_val=1.0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[Grads()])
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    return grads, {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def test_gradient_accumulation_equals_a_batch_twice_the_size():
    first, second = _mle_batch(4, seed=1), _mle_batch(4, seed=2)
    merged = {k: torch.cat([first[k], second[k]]) if torch.is_tensor(first[k]) else first[k] + second[k]
              for k in first}
    acc_grads, acc_params = _one_step([first, second], accumulate=2)
    big_grads, big_params = _one_step([merged], accumulate=1)
    assert acc_grads.keys() == big_grads.keys() and len(acc_grads) > 10
    for name in big_grads:  # gradients (magnitude included) before clipping and the AdamW step
        torch.testing.assert_close(acc_grads[name], big_grads[name], atol=1e-6, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    # AdamW's first step is ~lr * g / (|g| + eps): near-zero gradients amplify float noise, so the
    # parameters agree to 1% of a step (lr 1e-3); a wrong accumulation moves many by a whole step
    for name in big_params:
        torch.testing.assert_close(acc_params[name], big_params[name], atol=1e-5, rtol=0, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.slow  # 40-80 s of inductor compiling on 2 CPU cores
def test_compile_decoder_matches_eager():
    """torch.compile (inductor, C++ codegen with the machine's gcc) in place: same checkpoint keys,
    same log-probs and gradients as the eager decoder."""
    torch.manual_seed(0)
    eager = LocationModel(LocationModelConfig.preset("tiny", gpt2_dropout=0.0))
    compiled = LocationModel(LocationModelConfig.preset("tiny", gpt2_dropout=0.0, compile_decoder=True))
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    compiled.load_state_dict(eager.state_dict())
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    owner = torch.tensor([0, 1, 1])
    tokens = eager.tokenizer.encode(_boxes(owner))
    ref = _scores_and_grads(eager, images, ["dog", "cat"], owner, tokens, shared=True)
    new = _scores_and_grads(compiled, images, ["dog", "cat"], owner, tokens, shared=True)
    torch.testing.assert_close(new[0], ref[0], atol=1e-4, rtol=1e-4)
    for name in ref[3]:
        torch.testing.assert_close(new[3][name], ref[3][name], atol=1e-5, rtol=1e-3, msg=lambda m, name=name: f"{name}: {m}")
