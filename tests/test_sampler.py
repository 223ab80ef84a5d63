"""KV-cached, prefix-shared sampler (cascade and the earlier copied-cache decoder): exactness against
a naive decode and each other, validity, regions, seeds, and what the cascade never materialises."""
import pytest
import torch
import torch._dynamo
from torch.utils._python_dispatch import TorchDispatchMode

from genloc.testing import naive_reference_decode
from genloc import LocationModel, LocationModelConfig, SampleOutput, draw_tokens, filter_logits


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LocationModel(LocationModelConfig.preset("tiny")).eval()


@pytest.fixture(scope="module", params=[False, True], ids=["absolute", "relative-extents"])
def model64(request):
    """float64 copy: kernels round differently for a 1-token step than for a full sequence, by ~1e-7
    in float32; in float64 that is ~1e-16 and vanishes when the sampler casts logits to float32,
    so cached and naive decodes must then agree bit for bit. Both readings of the x2/y2 outputs."""
    torch.manual_seed(0)
    return LocationModel(LocationModelConfig.preset("tiny", relative_extents=request.param)).double().eval()


def _inputs(batch=3, seed=0):
    images = torch.rand(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    return images, ["dog", "cat", "car", "cup"][:batch]


SETTINGS = [
    dict(),
    dict(temperature=0.7, top_k=12, top_p=0.8),
    dict(temperature=1.5, region=torch.tensor([[0.5, 0.0, 1.0, 0.5], [0.1, 0.1, 0.4, 0.9], [0.0, 0.0, 1.0, 1.0]])),
    dict(size=torch.tensor([[0.2, 0.2, 0.1, 0.5], [0.0, 1.0, 0.0, 1.0], [0.05, 0.3, 0.3, 0.3]]),
         aspect_ratio=torch.tensor([0.5, 2.0]), region=torch.tensor([0.0, 0.2, 0.6, 1.0]), top_p=0.9),
]
SETTING_IDS = ["plain", "temp-topk-topp", "region", "size-aspect-region"]
DECODERS = pytest.mark.parametrize("cascade", [True, False], ids=["cascade", "copied-cache"])


@DECODERS
@pytest.mark.parametrize("kwargs", SETTINGS, ids=SETTING_IDS)
def test_sampler_equals_naive_reference_exactly(model64, kwargs, cascade):
    images, categories = _inputs()
    out = model64.sample(images, categories, n=8, generator=torch.Generator().manual_seed(7), cascade=cascade,
                         **kwargs)
    with torch.no_grad():
        prefix = model64.build_prefix(model64.encode_images(images), model64.encode_texts(categories))
    tokens, log_probs = naive_reference_decode(model64, prefix, 8, generator=torch.Generator().manual_seed(7),
                                               **kwargs)
    torch.testing.assert_close(out.tokens, tokens, atol=0, rtol=0)
    torch.testing.assert_close(out.log_probs, log_probs, atol=0, rtol=0)


@pytest.mark.parametrize("kwargs", SETTINGS, ids=SETTING_IDS)
def test_cascade_equals_copied_cache_decoder_exactly(model64, kwargs):
    images, categories = _inputs()
    a = model64.sample(images, categories, n=30, generator=torch.Generator().manual_seed(5), **kwargs)
    b = model64.sample(images, categories, n=30, generator=torch.Generator().manual_seed(5), cascade=False, **kwargs)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.log_probs, b.log_probs)


@DECODERS
def test_sampler_matches_naive_reference_in_float32(model, cascade):
    images, categories = _inputs()
    out = model.sample(images, categories, n=8, generator=torch.Generator().manual_seed(3), cascade=cascade)
    with torch.no_grad():
        prefix = model.build_prefix(model.encode_images(images), model.encode_texts(categories))
    tokens, log_probs = naive_reference_decode(model, prefix, 8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out.tokens, tokens)
    torch.testing.assert_close(out.log_probs, log_probs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative-extents"])
def test_cascade_matches_copied_cache_decoder_in_float32(relative):
    torch.manual_seed(1)
    model = LocationModel(LocationModelConfig.preset("tiny", relative_extents=relative)).eval()
    images, categories = _inputs(4)
    kwargs = dict(n=100, temperature=1.2, size=torch.tensor([0.1, 0.6, 0.1, 0.6]))
    a = model.sample(images, categories, generator=torch.Generator().manual_seed(2), **kwargs)
    b = model.sample(images, categories, generator=torch.Generator().manual_seed(2), cascade=False, **kwargs)
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.log_probs, b.log_probs, atol=1e-5, rtol=0)


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operator returns."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@DECODERS
def test_prefix_runs_once_and_only_the_copied_cache_decoder_repeats_it(model, cascade):
    shapes = []
    handle = model.decoder.transformer.register_forward_pre_hook(
        lambda mod, args, kwargs: shapes.append(tuple(kwargs["inputs_embeds"].shape)), with_kwargs=True)
    largest = _LargestTensor()
    try:
        with largest:
            model.sample(*_inputs(), n=50, cascade=cascade)
    finally:
        handle.remove()
    d = model.cfg.gpt2_n_embd
    prefix_copies = 3 * 50 * (model.prefix_len + 1) * d  # one layer's keys for every sample
    if cascade:  # GPT-2's forward runs once (prefix + BOS); the one-token steps attend to that cache in place
        assert shapes == [(3, model.prefix_len + 1, d)]
        assert largest.numel < prefix_copies / 4
    else:
        assert shapes == [(3, model.prefix_len + 1, d)] + [(150, 1, d)] * 3
        assert largest.numel >= prefix_copies


def _assert_valid(out, num_bins, region=None):
    t = out.tokens
    assert t.min() >= 0 and t.max() < num_bins
    assert (t[..., 2] > t[..., 0]).all() and (t[..., 3] > t[..., 1]).all()
    b = out.boxes_norm
    assert (b[..., 2] > b[..., 0]).all() and (b[..., 3] > b[..., 1]).all()
    if region is not None:
        r = region[:, None, :]
        assert (b[..., :2] >= r[..., :2]).all() and (b[..., 2:] <= r[..., 2:]).all()


def _ten_thousand(model, **kwargs):
    """10 x (4 images x 250 samples): chunks keep the repeated KV cache small."""
    images, categories = _inputs(4)
    gen = torch.Generator().manual_seed(0)
    outs = [model.sample(images, categories, n=250, temperature=2.0, generator=gen, **kwargs) for _ in range(10)]
    assert outs[0].tokens.shape == (4, 250, 4) and outs[0].log_probs.shape == (4, 250)
    return SampleOutput(*(torch.cat([getattr(o, f) for o in outs], dim=1)
                          for f in ("boxes", "boxes_norm", "tokens", "log_probs")))


def test_ten_thousand_samples_are_valid(model):
    out = _ten_thousand(model)
    assert out.tokens.shape == (4, 2500, 4)
    _assert_valid(out, 64)
    assert torch.isfinite(out.log_probs).all() and (out.log_probs <= 0).all()


def test_ten_thousand_region_samples_are_valid_and_inside(model):
    region = torch.tensor([[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0], [0.3, 0.6, 0.33, 0.7], [0.0, 0.5, 1.0, 1.0]])
    out = _ten_thousand(model, region=region)
    images, categories = _inputs(4)
    _assert_valid(out, 64, region)
    # the narrow region holds exactly the bin centres 19..20 (x) and 38..44 (y): one x choice, all y choices
    assert set(out.tokens[2, :, 0].tolist()) == {19} and set(out.tokens[2, :, 2].tolist()) == {20}
    assert set(out.tokens[2, :, 1].tolist()) == set(range(38, 44))
    # a single (4,) region applies to every image
    left = model.sample(images, categories, n=500, region=torch.tensor([0.0, 0.0, 0.5, 0.5]))
    _assert_valid(left, 64, torch.tensor([[0.0, 0.0, 0.5, 0.5]] * 4))


def test_sampler_log_prob_equals_forward_log_prob(model64):
    model = model64
    images, categories = _inputs()
    out = model.sample(images, categories, n=30, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        per_token = model(images.repeat_interleave(30, 0), [c for c in categories for _ in range(30)],
                          out.tokens.view(-1, 4))
    # the likelihood of a float64 model is float64; the sampler draws from float32 logits
    torch.testing.assert_close(per_token.sum(-1).view(3, 30).float(), out.log_probs, atol=1e-5, rtol=0)


def test_seeds_make_samples_reproducible(model):
    images, categories = _inputs()
    a = model.sample(images, categories, n=40, top_p=0.9, generator=torch.Generator().manual_seed(1))
    b = model.sample(images, categories, n=40, top_p=0.9, generator=torch.Generator().manual_seed(1))
    c = model.sample(images, categories, n=40, top_p=0.9, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.log_probs, b.log_probs)
    assert not torch.equal(a.tokens, c.tokens)


def test_truncation_changes_the_sampling_distribution(model):
    images, categories = _inputs()
    greedy = model.sample(images, categories, n=20, top_k=1)
    assert (greedy.tokens == greedy.tokens[:, :1]).all() and (greedy.log_probs == 0).all()
    nucleus = model.sample(images, categories, n=20, top_p=1e-6)
    assert torch.equal(nucleus.tokens, greedy.tokens)
    # greedy = argmax of the masked model distribution at every step
    with torch.no_grad():
        prefix = model.build_prefix(model.encode_images(images), model.encode_texts(categories))
        tokens = greedy.tokens[:, 0]
        for step in range(4):
            candidates = tokens[:, None, :].repeat(1, 64, 1)
            candidates[:, :, step] = torch.arange(64)
            allowed = model.allowed_tokens(step, tokens[:, :step], model.region_bounds(None, 3, tokens.device))
            for i in range(3):
                ok = allowed[i, :64].nonzero().squeeze(1)
                if step < 2:  # later tokens must stay valid for the candidates: keep the chosen x2/y2 feasible
                    ok = ok[ok < tokens[i, step + 2]]
                logp = model.box_log_probs(prefix[i:i + 1].expand(len(ok), -1, -1), candidates[i, ok])[:, step]
                assert ok[logp.argmax()] == tokens[i, step]
    k3 = model.sample(images, categories, n=100, top_k=3, generator=torch.Generator().manual_seed(0))
    assert max(len(set(k3.tokens[i, :, 0].tolist())) for i in range(3)) <= 3


def test_pixel_boxes_mode_and_errors(model):
    images, categories = _inputs(2)
    model.train()
    out = model.sample(images, categories, n=5, image_sizes=torch.tensor([[640, 480], [100, 50]]))
    assert model.training  # restored
    model.eval()
    scale = torch.tensor([[640, 480, 640, 480], [100, 50, 100, 50]], dtype=torch.float32)[:, None]
    assert torch.allclose(out.boxes, out.boxes_norm * scale)
    with pytest.raises(ValueError, match="fewer than 2 bin centres"):
        model.sample(images, categories, n=2, region=torch.tensor([0.5, 0.0, 0.51, 1.0]))
    with pytest.raises(ValueError, match="region must"):
        model.sample(images, categories, n=2, region=torch.tensor([0.0, 0.0, 1.5, 1.0]))
    with pytest.raises(ValueError, match="temperature"):
        model.sample(images, categories, n=2, temperature=0.0)
    with pytest.raises(ValueError, match="2 images but 1 categories"):
        model.sample(images, ["dog"], n=2)


# ------------------------------------------------------------------ filter_logits / draw_tokens on hand values
INF = float("inf")


def _kept(logits: torch.Tensor) -> list[int]:
    return torch.isfinite(logits).nonzero().squeeze(-1).tolist()


def test_temperature_divides_the_logits():
    out = filter_logits(torch.tensor([1.0, 2.0, -4.0, -INF]), temperature=2.0)
    assert out.tolist() == [0.5, 1.0, -2.0, -INF]
    assert torch.equal(filter_logits(torch.tensor([1.0, 2.0]), temperature=1.0), torch.tensor([1.0, 2.0]))


def test_top_k_keeps_every_token_tied_with_the_kth():
    assert _kept(filter_logits(torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0]), top_k=2)) == [0, 2, 4]
    assert _kept(filter_logits(torch.tensor([5.0, 4.0, 4.0, 1.0]), top_k=2)) == [0, 1, 2]
    assert _kept(filter_logits(torch.tensor([5.0, 4.0, 3.0, 1.0]), top_k=2)) == [0, 1]
    out = filter_logits(torch.tensor([0.0, -INF, 1.0]), top_k=10)  # k beyond the vocabulary, masked token stays out
    assert out.tolist() == [0.0, -INF, 1.0]
    rows = filter_logits(torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]), top_k=1)  # each row on its own
    assert _kept(rows[0]) == [2] and rows[1].isfinite().tolist() == [True, False, False]


def test_top_p_keeps_the_token_that_crosses_p():
    logits = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64).log()  # sorted: 0.5, 0.3, 0.2
    assert _kept(filter_logits(logits, top_p=0.1)) == [1]        # the most likely token always stays
    assert _kept(filter_logits(logits, top_p=0.6)) == [1, 2]     # 0.5 < 0.6: the 0.3 token crosses it
    assert _kept(filter_logits(logits, top_p=0.79)) == [1, 2]
    assert _kept(filter_logits(logits, top_p=0.81)) == [0, 1, 2]
    assert torch.equal(filter_logits(logits, top_p=1.0), logits) and torch.equal(filter_logits(logits), logits)
    kept = filter_logits(logits, top_p=0.6)
    assert torch.equal(kept[1:], logits[1:])  # survivors keep their logits (renormalised by the draw)


def test_top_p_applies_after_temperature_and_top_k():
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64).log()
    assert _kept(filter_logits(logits, top_p=0.5)) == [0, 1]
    assert _kept(filter_logits(logits, top_k=2, top_p=0.5)) == [0]  # renormalised 4/7 already reaches 0.5
    two = torch.tensor([0.6, 0.4], dtype=torch.float64).log()
    assert _kept(filter_logits(two, top_p=0.55)) == [0]
    assert _kept(filter_logits(two, temperature=100.0, top_p=0.55)) == [0, 1]  # flattened: 0.501 < 0.55


@pytest.mark.parametrize("kwargs, message", [(dict(temperature=0.0), "temperature"), (dict(top_k=0), "top_k"),
                                             (dict(top_k=2.5), "top_k"), (dict(top_p=0.0), "top_p"),
                                             (dict(top_p=1.5), "top_p")])
def test_filter_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        filter_logits(torch.zeros(3), **kwargs)


def test_draw_tokens_returns_the_draw_and_its_log_prob():
    half = torch.tensor(0.5).log().item()
    logits = torch.tensor([[0.0, -INF, -INF], [-INF, half, half]]).repeat(50, 1)
    tokens, logp = draw_tokens(logits, torch.Generator().manual_seed(0))
    assert (tokens[0::2] == 0).all() and (logp[0::2] == 0).all()
    assert set(tokens[1::2].tolist()) == {1, 2}
    torch.testing.assert_close(logp[1::2], torch.full((50,), half))
    again, _ = draw_tokens(logits, torch.Generator().manual_seed(0))
    assert torch.equal(tokens, again)


# ------------------------------------------------------------------ graphed sampling (CUDA graphs)
@pytest.mark.parametrize("cascade", [True, False])
def test_graphs_on_a_cpu_model_is_one_clear_line_before_any_work(model, monkeypatch, cascade):
    monkeypatch.setattr(model, "encode_images", lambda *a: pytest.fail("encoded before the check"))
    with pytest.raises(ValueError) as err:
        model.sample(*_inputs(), n=4, graphs=True, cascade=cascade)
    message = str(err.value)
    assert "\n" not in message and "graphs=True" in message and "model is on cpu" in message
    assert "leave graphs off" in message


def test_the_graphed_step_wraps_the_cascade_step_and_starts_a_graph_generation_per_decode(model, monkeypatch):
    """`graphed_cascade_step` with the compiler left out (compiling takes minutes on a CPU): the decode
    gives the eager decode's tokens, and each decode's first step marks a new CUDA-graph generation
    (the previous decode's graph outputs may then be overwritten)."""
    from genloc import sampler

    monkeypatch.setattr(sampler, "_graphed", {})
    monkeypatch.setattr(torch, "compile", lambda fn, **options: fn if options == {
        "mode": "reduce-overhead", "dynamic": False} else pytest.fail(f"compiled with {options}"))
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)  # torch's default, restored after the test
    marks, positions = [], []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(len(positions)))
    step = sampler.graphed_cascade_step(LocationModel)
    assert torch._dynamo.config.recompile_limit == sampler.GRAPHED_RECOMPILE_LIMIT

    def recorded(model_, hidden, position, shared, own):
        positions.append(position)
        return step(model_, hidden, position, shared, own)

    images, categories = _inputs()
    with torch.no_grad():
        prefix = model.build_prefix(model.encode_images(images), model.encode_texts(categories))
    bounds = model.region_bounds(None, 3, prefix.device)
    decoded = [model._decode_cascade(prefix, 6, bounds, 1.0, None, None, torch.Generator().manual_seed(3), None,
                                     recorded) for _ in range(2)]
    eager = model.sample(images, categories, n=6, generator=torch.Generator().manual_seed(3))
    for tokens, log_probs in decoded:
        assert torch.equal(tokens, eager.tokens) and torch.equal(log_probs, eager.log_probs)
    first = model.prefix_len + 1
    assert positions == [first, first + 1, first + 2] * 2 and marks == [1, 4]  # in each decode's first step
