"""One decoder pass per training step (`LocationModel.batch_log_probs(one_pass=True)`) gives the values
and gradients of the full-sequence path, and the training step reads nothing back from the device:
token boxes are checked on the host (`BoxBatch`) before the batch moves."""
import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from genloc import LocationModel, LocationModelConfig
from genloc.likelihood import BoxBatch, one_pass_mask
from genloc.checkpoint import save_model_checkpoint
from lightning_modules.dpo import DPOModule, pair_box_log_probs, pair_boxes
from lightning_modules.mle import MLEModule
from benchmarks.chip import HostReads
from tests.helpers.batches import OPTIM, pair_batch

OWNERS = {"one box per image": [0, 1, 2], "several, one image without": [0, 0, 2, 2, 2, 0]}


def _model(relative_extents: bool) -> LocationModel:
    torch.manual_seed(0)
    return LocationModel(LocationModelConfig.preset("tiny", relative_extents=relative_extents)).double().eval()


def _tokens(count: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lo = torch.randint(0, 40, (count, 2), generator=g)
    return torch.cat([lo, lo + 1 + torch.randint(0, 23, (count, 2), generator=g)], dim=1)


@pytest.mark.parametrize("relative_extents", [False, True])
@pytest.mark.parametrize("layout", list(OWNERS))
def test_one_pass_equals_the_repeated_prefix_in_values_and_gradients(relative_extents, layout):
    model = _model(relative_extents)
    owner = torch.tensor(OWNERS[layout])
    tokens = _tokens(len(owner), seed=len(owner))
    prefix = torch.randn(3, model.prefix_len, model.cfg.gpt2_n_embd, dtype=torch.float64, requires_grad=True)
    weight = model.decoder.transformer.h[0].attn.c_attn.weight

    def run(fn):
        logp, dist = fn()
        grads = torch.autograd.grad((logp * torch.arange(1.0, 5.0, dtype=logp.dtype)).sum(), (prefix, weight))
        return logp, dist, grads

    expected = run(lambda: model.box_log_probs(prefix[owner], tokens, with_distribution=True))
    boxes = BoxBatch.build(tokens, owner, 3, model.cfg.num_bins)
    assert boxes.one_each == (layout == "one box per image")
    assert boxes.per_image == (1 if boxes.one_each else 4)  # 3 boxes of image 2 padded to the bucket of 4
    for one_pass in (True, False):
        got = run(lambda: model.batch_log_probs(prefix, boxes, with_distribution=True, one_pass=one_pass))
        torch.testing.assert_close(got[0], expected[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(got[1], expected[1], rtol=0, atol=1e-12)
        for g, e in zip(got[2], expected[2]):
            torch.testing.assert_close(g, e, rtol=0, atol=1e-12)


def test_the_mask_keeps_boxes_apart():
    mask = one_pass_mask(3, 2, torch.device("cpu"))[0, 0]
    assert mask.shape == (11, 11)
    assert torch.equal(mask[:3, :3], torch.ones(3, 3).tril().bool()) and not mask[:3, 3:].any()
    assert mask[3:, :3].all()                                             # every box token sees the prefix
    assert torch.equal(mask[3:7, 3:7], torch.ones(4, 4).tril().bool())    # box 1: its own earlier tokens
    assert not mask[7:, 3:7].any() and not mask[3:7, 7:].any()            # never the other box
    assert torch.equal(mask[7:, 7:], torch.ones(4, 4).tril().bool())


def test_box_batch_checks_on_the_host_and_names_the_row():
    good = torch.tensor([[1, 2, 5, 6], [0, 0, 63, 63]])
    with pytest.raises(ValueError, match=r"token box \[5, 2, 5, 6\] \(row 1\) is not a valid box"):
        BoxBatch.build(torch.tensor([[1, 2, 5, 6], [5, 2, 5, 6]]), torch.tensor([0, 1]), 2, 64)
    with pytest.raises(ValueError, match=r"row 0"):
        BoxBatch.build(torch.tensor([[1, 2, 5, 64]]), torch.tensor([0]), 1, 64)  # past the last bin
    with pytest.raises(ValueError, match="owner indices"):
        BoxBatch.build(good, torch.tensor([0, 2]), 2, 64)
    with pytest.raises(ValueError, match=r"tokens must be \[M, 4\]"):
        BoxBatch.build(good[:, :3], torch.tensor([0, 1]), 2, 64)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="on the host"):
            BoxBatch.build(good.cuda(), torch.tensor([0, 1]), 2, 64)
    boxes = BoxBatch.build(good[[1, 0, 1]], torch.tensor([2, 0, 2]), 3, 64)
    assert boxes.slot.tolist() == [0, 0, 1] and boxes.per_image == 2 and not boxes.one_each
    buckets = {BoxBatch.build(good[[0] * m], torch.zeros(m, dtype=torch.long), 1, 64).per_image for m in range(1, 17)}
    assert buckets == {1, 2, 4, 8, 16}  # 16 box counts, 5 shapes
    kept = boxes.select([0, 2])
    assert kept.owner.tolist() == [1, 0, 1] and kept.images == 2


def _mle(one_pass: bool, **model) -> MLEModule:
    torch.manual_seed(0)
    config = LocationModelConfig.preset("tiny", gpt2_dropout=0.0, **model).to_dict()
    return MLEModule(model_config=config, optim=OPTIM, one_pass=one_pass).double()


def _mle_batch() -> dict:
    return {"key": ["a", "b", "c"], "image": torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1)),
            "category": ["car", "bird", "car"],
            "positives": [torch.tensor([[0.1, 0.5, 0.4, 0.7]]),
                          torch.tensor([[0.2, 0.1, 0.3, 0.2], [0.6, 0.1, 0.7, 0.15], [0.0, 0.0, 1.0, 1.0]]),
                          torch.zeros(0, 4)]}


@pytest.mark.parametrize("relative_extents", [False, True])
def test_mle_step_same_loss_and_gradients_with_one_pass(relative_extents):
    results = []
    for one_pass in (False, True):
        module = _mle(one_pass, relative_extents=relative_extents)
        batch = module.on_before_batch_transfer(_mle_batch(), 0)
        nll, loss, accuracy, n_boxes = module.box_nll(batch)
        loss.backward()
        results.append((nll.detach(), accuracy, n_boxes,
                        {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}))
    (nll0, acc0, n0, g0), (nll1, acc1, n1, g1) = results
    assert n0 == n1 == 4 and acc0 == acc1
    torch.testing.assert_close(nll1, nll0, rtol=0, atol=1e-12)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=0, atol=1e-12, msg=name)


class DecoderCalls:
    """Counts calls of a model's GPT-2 (a forward hook)."""

    def __init__(self, *models):
        self.count = 0
        self.handles = [m.decoder.register_forward_hook(self._hook) for m in models]

    def _hook(self, *args):
        self.count += 1


def test_one_decoder_call_per_model_and_step():
    for one_pass, calls in ((True, 1), (False, 2)):
        module = _mle(one_pass)
        counter = DecoderCalls(module.model)
        module.box_nll(module.on_before_batch_transfer(_mle_batch(), 0))[1].backward()
        assert counter.count == calls, (one_pass, counter.count)


@pytest.fixture(scope="module")
def mle_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    module = MLEModule(model_config=LocationModelConfig.preset("tiny", relative_extents=True).to_dict(), optim=OPTIM)
    path = tmp_path_factory.mktemp("mle") / "mle.ckpt"
    save_model_checkpoint(module.model, path)
    return str(path)


def _dpo(mle_ckpt, one_pass: bool) -> DPOModule:
    module = DPOModule(optim=OPTIM, beta=0.5, reference=mle_ckpt, one_pass=one_pass).double()
    module._reference()
    return module


def test_dpo_same_values_and_gradients_and_one_call_per_model(mle_ckpt):
    out = []
    for one_pass in (False, True):
        module = _dpo(mle_ckpt, one_pass)
        torch.manual_seed(3)
        with torch.no_grad():  # policy != reference, so the rewards are not all zero
            module.model.image_proj.weight.add_(0.05 * torch.randn_like(module.model.image_proj.weight))
        batch = module.on_before_batch_transfer(dict(pair_batch(0), image=pair_batch(0)["image"].double()), 0)
        counter = DecoderCalls(module.model, module.reference.model)
        stats = module.dpo_metrics(batch)
        stats["loss"].backward()
        assert counter.count == (2 if one_pass else 4)  # policy + reference, one call each with one_pass
        out.append((module.pair_log_probs(batch), {n: p.grad.clone() for n, p in module.named_parameters()
                                                   if p.grad is not None}))
    (lp0, g0), (lp1, g1) = out
    for name in lp0:
        torch.testing.assert_close(lp1[name], lp0[name], rtol=0, atol=1e-12)
    assert lp0["policy_chosen"].ne(lp0["ref_chosen"]).all()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=0, atol=1e-12, msg=name)
    # and both equal the repeated-prefix path of `box_log_probs`
    model, batch = module.model, pair_batch(0)
    prefix = model.build_prefix(model.encode_images(batch["image"].double()), model.encode_texts(batch["category"]))
    chosen, rejected = model.tokenizer.encode(batch["chosen"]), model.tokenizer.encode(batch["rejected"])
    direct = torch.stack([model.box_log_probs(prefix, chosen).sum(-1), model.box_log_probs(prefix, rejected).sum(-1)], 1)
    paired = pair_box_log_probs(model, prefix, pair_boxes(chosen, rejected, model.cfg.num_bins), one_pass=True)
    torch.testing.assert_close(paired, direct, rtol=0, atol=1e-12)


class NoHostReadsInStep(L.Callback):
    """Forward, loss, logging and backward of every training step under `HostReads` (the optimiser's
    CPU step reads its step count; the fused CUDA AdamW does not, and the GPU check's sync-debug part
    covers it)."""

    def __init__(self):
        self.steps = 0
        self.guard = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        step = module.training_step

        def guarded(*args, **kwargs):
            with HostReads():
                return step(*args, **kwargs)
        module.training_step = guarded
        self.restore = lambda: setattr(module, "training_step", step)

    def on_before_backward(self, trainer, module, loss):
        self.guard = HostReads().__enter__()

    def on_after_backward(self, trainer, module):
        self.guard.__exit__()
        self.steps += 1

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.restore()


def _fit(module, batches):
    guard = NoHostReadsInStep()
    trainer = L.Trainer(max_steps=len(batches), accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[guard], log_every_n_steps=1)
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None, collate_fn=lambda b: b))
    return guard.steps


@pytest.mark.parametrize("one_pass", [False, True])
def test_training_steps_read_nothing_back_from_the_device(one_pass, mle_ckpt):
    torch.manual_seed(0)
    mle = MLEModule(model_config=LocationModelConfig.preset("tiny").to_dict(), optim=OPTIM, one_pass=one_pass)
    one_each = dict(_mle_batch(), positives=[torch.tensor([[0.1, 0.5, 0.4, 0.7]])] * 3)  # the plain causal pass
    assert _fit(mle, [_mle_batch(), one_each]) == 2
    dpo = DPOModule(optim=OPTIM, beta=0.5, reference=mle_ckpt, one_pass=one_pass)
    assert _fit(dpo, [pair_batch(0), pair_batch(1)]) == 2


def test_the_guard_catches_a_host_read():
    with HostReads(), pytest.raises(AssertionError, match="Tensor.item read a value back"):
        torch.ones(2).sum().item()
    with HostReads(), pytest.raises(AssertionError, match="__bool__"):
        if torch.ones(2).all():
            pass
    model = _model(False)
    prefix = torch.randn(1, model.prefix_len, model.cfg.gpt2_n_embd, dtype=torch.float64)
    with HostReads(), pytest.raises(AssertionError, match="__bool__"):
        model.box_log_probs(prefix, _tokens(1, 0))  # its device-side validity check reads a bool back
    assert torch.ones(1).item() == 1.0  # restored


def test_an_invalid_box_fails_on_the_host_before_the_batch_moves(mle_ckpt):
    mle = _mle(False)
    batch = _mle_batch()
    batch["positives"][0] = torch.tensor([[0.5, 0.5, 0.2, 0.7]])  # x2 < x1
    with pytest.raises(ValueError, match="normalised box"):
        mle.on_before_batch_transfer(batch, 0)
    dpo = DPOModule(optim=OPTIM, beta=0.5, reference=mle_ckpt)
    bad = pair_batch(0)
    del bad["rejected"]
    assert dpo.on_before_batch_transfer(bad, 0) is bad and "token_boxes" not in bad  # dpo_metrics names the key


def test_the_switch_is_a_module_key_of_the_config():
    from configs.schema import ConfigError, load_config

    assert load_config(["module.one_pass=true"]).module.one_pass is True
    assert load_config([]).module.one_pass is False  # the CPU default: today's two passes
    with pytest.raises(ConfigError, match="one_pass"):
        load_config(["module.one_pass=sometimes"])
