"""The continuous decoder (tunelab.evaluation.decode) against transformers generate, token for token.

Where batch shape changes float rounding: the reference is ``generate`` run per prompt (batch 1,
no padding). The continuous decoder runs rows in batches of changing composition with left
padding, so (a) a row's attention sums over more (masked) columns, which adds exact zeros but can
change the blocking of the reduction, and (b) the matmuls' row count changes with the batch,
which lets the BLAS pick another kernel; (c) prompt lookup checks several tokens of a row in one
forward (another matmul shape again); (d) through ``engine.generate`` on a CPU the linear layers run
on oneDNN with packed weights instead of MKL (same products, summed in another order). All move
logits by ~1e-7 in fp32 (oneDNN ~1e-6 relative); a greedy choice
can flip only where the two best logits are that close. So a divergence is accepted only at a
near tie (``_assert_same_or_near_tie``), checked on batch-1 logits of the shared prefix; on the
tiny fp32 model of these tests none occurs (every comparison is exact today).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tunelab.config import EvalConfig
from tunelab.evaluation.decode import ContinuousDecoder, IncrementalText, unsupported_reason
from tunelab.evaluation.lookup import NgramDrafter
from tunelab.evaluation.slot_cache import SlotCache
from tunelab.evaluation.engine import generate

MAX_NEW = 24
TIE = 1e-4  # logits this close may swap order under different batch shapes (fp32)


@pytest.fixture(scope="module")
def model_and_tok(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def _prompts(tok) -> list[list[int]]:
    """Prompts from 1 to ~200 tokens (very different lengths, so rows are left-padded and refilled)."""
    texts = ["Hi", "Question: what is 2+2?\nAnswer:", "A much longer prompt, " * 30, "x",
             "The quick brown fox jumps over the lazy dog. " * 6, "Once upon", "1 2 3 4 5 6 7",
             "Héllo wörld — naïve café ☕, 数学", "Why?", "List: apples, pears, " * 10, "z z", "End."]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


_REFERENCE: dict[tuple, list[int]] = {}  # (model id, prompt, max_new, eos) -> tokens: computed once per module


def _hf_one(model, tok, prompt: list[int], max_new: int = MAX_NEW, eos: int | None = None) -> list[int]:
    """Greedy transformers generate on one prompt (batch 1): the reference tokens (EOS included)."""
    eos = tok.eos_token_id if eos is None else eos
    key = (id(model), tuple(prompt), max_new, eos)
    if key not in _REFERENCE:
        _REFERENCE[key] = _hf_generate(model, tok, prompt, max_new, eos)
    return _REFERENCE[key]


@torch.inference_mode()
def _hf_generate(model, tok, prompt: list[int], max_new: int, eos: int) -> list[int]:
    out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=eos)
    row = out[0, len(prompt):].tolist()
    return row[: row.index(eos) + 1] if eos in row else row


@torch.inference_mode()
def _assert_same_or_near_tie(model, prompt: list[int], got: list[int], ref: list[int]) -> None:
    """Equal tokens; or equal up to a step where the reference's two best logits are a near tie."""
    if got == ref:
        return
    k = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
    assert k < min(len(got), len(ref)), f"one is a prefix of the other: {got} vs {ref}"
    logits = model(input_ids=torch.tensor([prompt + ref[:k]])).logits[0, -1]
    top2 = logits.topk(2).values
    assert float(top2[0] - top2[1]) < TIE, f"diverged at token {k} without a near tie: {got} vs {ref}"


@pytest.mark.parametrize("slots", [1, 3, 8])
def test_greedy_tokens_equal_generate(model_and_tok, slots):
    model, tok = model_and_tok
    prompts = _prompts(tok)
    got = ContinuousDecoder(model, tok, slots, MAX_NEW, [tok.eos_token_id]).run(prompts)
    for p, g in zip(prompts, got):
        _assert_same_or_near_tie(model, p, g, _hf_one(model, tok, p))
        assert len(g) == MAX_NEW or g[-1] == tok.eos_token_id


@pytest.fixture(scope="module")
def varied_model(varied_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(varied_model_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("drafts", ["lookup", "wrong"])
@pytest.mark.parametrize("slots", [1, 3, 8])
def test_prompt_lookup_keeps_the_greedy_tokens(model_and_tok, varied_model, slots, drafts, monkeypatch):
    """Drafts checked in one forward give the tokens of one-token-at-a-time greedy decoding (checking
    k drafts at once changes the matmul shapes, hence the near-tie rule).

    "lookup": the tiny model loops, so prompt lookup's drafts are accepted and a run needs fewer
    forwards than tokens. "wrong": the varied model with drafts that are (almost) never right, so a
    step keeps one token and leaves holes; with the cache's slack cut from 64 columns to 4 they are
    squeezed out (SlotCache.compact) again and again, and the tokens are still greedy's.
    """
    model, tok = model_and_tok
    if drafts == "wrong":
        model = varied_model
        monkeypatch.setattr(NgramDrafter, "draft", lambda self, k: [self.ids[-1]] * k)
    prompts = _prompts(tok)
    compactions = []
    compact, init = SlotCache.compact, SlotCache.__init__
    monkeypatch.setattr(SlotCache, "compact", lambda self: compactions.append(self.length) or compact(self))
    monkeypatch.setattr(SlotCache, "__init__", lambda self, slots, capacity: init(self, slots, capacity - 60))
    dec = ContinuousDecoder(model, tok, slots, MAX_NEW, [tok.eos_token_id], lookup_tokens=4, draft_budget=10_000)
    got = dec.run(prompts)
    for p, g in zip(prompts, got):
        _assert_same_or_near_tie(model, p, g, _hf_one(model, tok, p))
    if drafts == "lookup":
        assert dec.stats["accepted"] > 0
        assert dec.stats["steps"] < sum(len(g) for g in got) / min(slots, len(prompts))
    else:
        assert dec.stats["drafted"] > 4 * dec.stats["accepted"] and len(compactions) > 1


def test_ngram_drafter_copies_what_followed_the_latest_match():
    d = NgramDrafter([5, 6, 7, 8, 5, 6, 9])
    assert d.draft(3) == []  # 9 never occurred before
    d.push(5)
    assert d.draft(3) == [6, 9, 5]  # latest earlier 5 (index 4), 1-gram
    d.push(6)
    assert d.draft(2) == [9, 5]  # "5 6" last seen at 4-5, followed by 9
    d.push(7)
    assert d.draft(4) == [8, 5, 6, 9]  # "5 6 7" only at 0-2 (the longest match wins over "6 7", "7")
    assert d.draft(0) == []
    assert NgramDrafter([1, 2, 1, 2]).draft(5) == [1, 2, 1, 2, 1]  # a loop continues periodically


def test_eos_ends_a_row_and_is_kept(model_and_tok):
    """A row ends at the first EOS id (kept, as generate keeps it); other rows go on."""
    model, tok = model_and_tok
    prompts = _prompts(tok)
    free = [_hf_one(model, tok, p, eos=-1) for p in prompts]
    eos = free[0][5]  # a token the first row generates: treat it as EOS
    got = ContinuousDecoder(model, tok, 3, MAX_NEW, [eos]).run(prompts)
    assert got[0] == free[0][: free[0].index(eos) + 1]
    for p, g in zip(prompts, got):
        _assert_same_or_near_tie(model, p, g, _hf_one(model, tok, p, eos=eos))


def _split_stop_string(tok, tokens: list[int]) -> str:
    """A stop string that starts inside one token and ends inside the next (ids 3 and 4 of a completion)."""
    a, b = tok.decode(tokens[3:4]), tok.decode(tokens[4:5])
    assert a and b, "the completion needs two text tokens there"
    return a[-1] + b[:1]


@pytest.mark.parametrize("slots", [1, 3, 8])
def test_engine_continuous_equals_hf_with_stop_rule(model_and_tok, slots):
    """Through engine.generate: same texts and token counts as the hf path (batch 1), a stop string split across tokens."""
    model, tok = model_and_tok
    prompts = [tok.decode(p) for p in _prompts(tok)]
    first = _hf_one(model, tok, tok(prompts[1], add_special_tokens=False)["input_ids"])
    stop = _split_stop_string(tok, first)
    check = lambda text: stop in text  # noqa: E731
    cfg = EvalConfig(batch_size=slots, max_new_tokens=MAX_NEW, decoder="continuous")
    ours, n_ours = generate(model, tok, prompts, cfg, check, progress=False)
    key = ("engine-ref", id(model), stop)
    if key not in _REFERENCE:
        _REFERENCE[key] = [generate(model, tok, [p], replace(cfg, batch_size=1, decoder="hf"), check, progress=False)
                           for p in prompts]
    ref = _REFERENCE[key]
    assert ours == [r[0][0] for r in ref]
    assert stop in ours[1]
    assert n_ours == sum(r[1] for r in ref)


def test_hf_batches_count_stopped_rows_exactly_when_pad_is_eos(model_and_tok):
    """The hf path in batches: rows stopped by the task's rule are padded by generate after the stop;
    with the pad token equal to EOS (SmolLM2's case) that padding is not counted as an EOS. Texts and
    token counts equal the continuous decoder's (which counts what it fed)."""
    model, tok = model_and_tok
    prompts = [tok.decode(p) for p in _prompts(tok)]
    first = _hf_one(model, tok, tok(prompts[1], add_special_tokens=False)["input_ids"])
    stop = _split_stop_string(tok, first)
    check = lambda text: stop in text  # noqa: E731
    cfg = EvalConfig(batch_size=4, max_new_tokens=MAX_NEW, decoder="hf")
    saved = tok.pad_token_id
    try:
        tok.pad_token_id = tok.eos_token_id
        hf, n_hf = generate(model, tok, prompts, cfg, check, progress=False)
        cont, n_cont = generate(model, tok, prompts, replace(cfg, decoder="continuous"), check, progress=False)
    finally:
        tok.pad_token_id = saved
    assert stop in hf[1]
    assert hf == cont
    assert n_hf == n_cont


def test_stop_check_sees_whole_text_at_first_match(model_and_tok):
    """A row stops at the first token whose text satisfies the rule, not later."""
    model, tok = model_and_tok
    prompts = _prompts(tok)
    free = _hf_one(model, tok, prompts[1], eos=-1)
    stop = _split_stop_string(tok, free)
    got = ContinuousDecoder(model, tok, 2, MAX_NEW, [tok.eos_token_id], lambda t: stop in t).run(prompts)[1]
    assert stop in tok.decode(got) and stop not in tok.decode(got[:-1])


def test_incremental_text_equals_decode(model_and_tok):
    """Each push gives decode(ids so far) (None when unchanged): merges, multi-byte characters, specials."""
    _, tok = model_and_tok
    text = "Héllo wörld — naïve café ☕ 数学 🤖🤖 done.\n#### 42\n"
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    inc, last = IncrementalText(tok), ""
    for i, t in enumerate(ids):
        shown = inc.push(t)
        full = tok.decode(ids[: i + 1], skip_special_tokens=True)
        if shown is None:
            assert full == last
        else:
            assert shown == full
            last = full
    assert inc.text == tok.decode(ids, skip_special_tokens=True)
    assert any(len(tok.decode([t])) and "\ufffd" in tok.decode([t]) for t in ids), "the text has split characters"


def test_on_batch_reports_rows_as_they_finish(model_and_tok):
    """on_batch covers every row once, with its final text, group by group as rows finish."""
    model, tok = model_and_tok
    prompts = [tok.decode(p) for p in _prompts(tok)]
    calls: list[tuple[list[int], list[str]]] = []
    cfg = EvalConfig(batch_size=4, max_new_tokens=MAX_NEW, decoder="continuous")
    texts, _ = generate(model, tok, prompts, cfg, lambda text: len(text) >= 40, progress=False,
                        on_batch=lambda ids, got: calls.append((list(ids), list(got))))
    assert sorted(i for ids, _ in calls for i in ids) == list(range(len(prompts)))
    assert len(calls) > 1, "rows finishing at different steps are reported separately"
    for ids, got in calls:
        assert got == [texts[i] for i in ids]


def test_rows_finish_in_order_of_their_length(model_and_tok):
    """With a slot per prompt all rows start together: a row reported earlier generated fewer tokens."""
    model, tok = model_and_tok
    prompts = _prompts(tok)
    groups: list[list[list[int]]] = []
    ContinuousDecoder(model, tok, len(prompts), MAX_NEW, [tok.eos_token_id], lambda t: len(t) >= 40).run(
        prompts, on_finish=lambda ids, tokens: groups.append(tokens))
    lengths = [[len(t) for t in g] for g in groups]
    assert all(len(set(g)) == 1 for g in lengths), "one call per finishing step"
    assert [g[0] for g in lengths] == sorted({g[0] for g in lengths})


def test_sampling_top_k_1_is_greedy_and_seeded_sampling_repeats(model_and_tok):
    model, tok = model_and_tok
    prompts = _prompts(tok)[:5]
    greedy = ContinuousDecoder(model, tok, 3, 12, [tok.eos_token_id]).run(prompts)
    top1 = ContinuousDecoder(model, tok, 3, 12, [tok.eos_token_id],
                             sampling={"do_sample": True, "temperature": 0.7, "top_k": 1}).run(prompts)
    assert top1 == greedy
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(ContinuousDecoder(model, tok, 3, 12, [tok.eos_token_id],
                                      sampling={"do_sample": True, "temperature": 1.5}).run(prompts))
    assert runs[0] == runs[1] and runs[0] != greedy


def test_beam_search_and_streaming_keep_hf(model_and_tok):
    model, _ = model_and_tok
    assert unsupported_reason(model) is None
    assert "beam" in unsupported_reason(model, num_beams=2)
    assert "n" in unsupported_reason(model, no_repeat_ngram_size=3)
    assert "stream" in unsupported_reason(model, sampling={"streamer": object()})


def test_beam_config_through_engine_equals_hf(model_and_tok):
    model, tok = model_and_tok
    prompts = [tok.decode(p) for p in _prompts(tok)[:3]]
    cfg = EvalConfig(batch_size=2, max_new_tokens=8, num_beams=2)
    assert generate(model, tok, prompts, cfg, progress=False) == generate(
        model, tok, prompts, replace(cfg, decoder="hf"), progress=False)


def test_slot_cache_makes_room_for_a_longer_prompt_and_compacts():
    """Inserting a group wider than the cache shifts the live rows right; a full cache drops shared left padding."""
    from transformers.cache_utils import DynamicCache

    def prefilled(width_rows: list[int], width: int) -> tuple[DynamicCache, torch.Tensor]:
        cache = DynamicCache()
        k = torch.arange(len(width_rows) * width, dtype=torch.float32).reshape(len(width_rows), 1, width, 1) + 1
        cache.update(k, -k, 0)
        mask = torch.zeros(len(width_rows), width, dtype=torch.long)
        for r, n in enumerate(width_rows):
            mask[r, width - n:] = 1
        return cache, mask

    kv = SlotCache(slots=3, capacity=8)
    c, m = prefilled([3], 3)
    kv.insert(c, m)
    assert kv.length == 3 and kv.mask[0, :3].tolist() == [1, 1, 1]
    c, m = prefilled([5, 2], 5)
    kv.insert(c, m)  # wider than the cache: row 0 moves right by 2
    assert kv.length == 5
    assert kv.mask[:3, :5].tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    assert kv.layers[0].keys_buf[0, 0, 2:5, 0].tolist() == [1.0, 2.0, 3.0]
    kv.keep([2])  # only the 2-token row is left; 3 columns of shared padding
    for _ in range(3):
        mask = kv.open_columns(1)
        for layer in kv.layers:
            layer.length += 1
        kv.advance()
    assert kv.length == 8
    mask = kv.open_columns(1)  # full: compacts to the live row's 5 columns, then opens one
    assert kv.length == 5 and mask.tolist() == [[1, 1, 1, 1, 1, 1]]
    assert kv.layers[0].keys_buf[0, 0, 0:2, 0].tolist() == [9.0, 10.0]


def test_slot_cache_squeezes_out_rejected_columns_when_full():
    """Two rows write 3 columns per step and keep 1 and 2 of them: once the buffers are full the holes
    go, each row's kept columns in order, right-aligned, and the next step has room."""
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache()
    k = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(2, 1, 2, 1)
    cache.update(k, -k, 0)
    kv = SlotCache(slots=2, capacity=9)
    kv.insert(cache, torch.ones(2, 2, dtype=torch.long))
    value = 10.0
    for _ in range(2):  # each step: 3 columns; row 0 keeps 1, row 1 keeps 2
        kv.open_columns(3)
        for layer in kv.layers:
            width = torch.arange(value, value + 6).reshape(2, 1, 3, 1)
            layer.update(width, -width)
        kv.reject(0, 1, 3)
        kv.reject(1, 2, 3)
        kv.advance(3)
        value += 6
    assert kv.length == 8 and kv.mask[:2].tolist() == [[1, 1, 1, 0, 0, 1, 0, 0, 0], [1, 1, 1, 1, 0, 1, 1, 0, 0]]
    mask = kv.open_columns(3)  # no shared left padding to drop: the holes go
    assert kv.length == 6 and mask.tolist() == [[0, 0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1, 1]]
    keys = kv.layers[0].keys_buf
    assert keys[0, 0, 2:6, 0].tolist() == [1.0, 2.0, 10.0, 16.0]
    assert keys[1, 0, :6, 0].tolist() == [3.0, 4.0, 13.0, 14.0, 19.0, 20.0]
    assert torch.equal(kv.layers[0].values_buf[:, :, :6], -keys[:, :, :6])


def test_packed_linears_match_nn_linear_and_are_restored(model_and_tok):
    """oneDNN on packed weights: the model's logits to float rounding, the modules as they were after
    the block (also after an error), and bf16 autocast inside the block takes the usual path."""
    from tunelab.cpu_kernels import available, packed_linears

    if not available():
        pytest.skip("this torch build has no oneDNN packed linear ops")
    model, tok = model_and_tok
    ids = torch.tensor([tok("Question: 2 + 3 = ?\nAnswer:")["input_ids"]])
    with torch.inference_mode():
        ref = model(ids).logits
        n_layers = sum(type(m) is torch.nn.Linear for m in model.modules())
        with packed_linears(model) as n:
            assert n == n_layers > 0
            got = model(ids).logits
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert model(ids).logits.dtype == torch.bfloat16
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        with pytest.raises(RuntimeError, match="inside"):
            with packed_linears(model):
                raise RuntimeError("inside")
    assert not any("forward" in vars(m) for m in model.modules())
    with packed_linears(model, enabled=False) as n:
        assert n == 0
    head = model.lm_head
    hook = head.forward  # a bound method set on the instance, as accelerate's hooks do
    head.forward = hook
    try:
        with packed_linears(model) as n_hooked:
            assert n_hooked == n_layers - 1 and head.forward is hook
        assert head.forward is hook  # not removed on the way out
    finally:
        del head.forward
