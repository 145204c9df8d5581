"""The continuous-batching engine: every request's output equals generating it alone."""

import pytest
import torch
from torch._dynamo.utils import counters

from lmforge.config import preset
from lmforge.infer import Engine, QueueFull, SamplingConfig, SamplingParams, TextStream, generate_tokens, load
from lmforge.infer.engine import _common_prefix, span_buckets
from lmforge.model import Transformer
from lmforge.utils.errors import UserError

from conftest import varied_transformer

PROMPTS = [[1, 2, 3], [9] * 11, [4, 8, 15, 16, 23, 42], [7], list(range(20, 45)), [5, 5, 6], [30, 31]]


@pytest.fixture(scope="module")
def model(varied_model):
    return varied_model


@pytest.fixture(scope="module")
def lm(trained_run):
    return load(trained_run.out, device="cpu")


def greedy_alone(model, prompt, n):
    return list(generate_tokens(model, prompt, n, SamplingConfig(temperature=0)))


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_batched_greedy_equals_each_request_alone(arch):
    """7 requests through 3 slots, prompts prefilled in chunks of 4: requests join and leave mid-flight."""
    llama = dict(position="rotary", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False)
    model = varied_transformer(1, **(llama if arch == "llama" else {}))
    engine = Engine(model, max_batch=3, prefill_chunk=4)
    lengths = [12, 5, 20, 9, 3, 15, 7]
    reqs = engine.generate(PROMPTS, [SamplingParams(temperature=0, max_tokens=n) for n in lengths])
    for req, prompt, n in zip(reqs, PROMPTS, lengths):
        assert req.finish_reason == "length"
        assert req.output == greedy_alone(model, prompt, n)
    assert engine.running == 0 and not engine.waiting


def test_trained_model_text_equals_generating_alone(lm):
    engine = Engine(lm.model, lm.tokenizer, max_batch=4, prefill_chunk=8)
    prompts = ["ROMEO:", "JULIET:\nO", "First Citizen:\nWe are", "KING"]
    reqs = engine.generate([lm.tokenizer.encode(p) for p in prompts],
                           SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    for req, prompt in zip(reqs, prompts):
        assert req.text == lm.generate(prompt, 24, temperature=0, stop_at_eot=False)


def test_seeded_sampling_is_independent_of_the_batch(model):
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=30, seed=123, max_tokens=15)
    alone = Engine(model, max_batch=1).generate([PROMPTS[2]], p)[0].output
    others = [SamplingParams(temperature=1.0, max_tokens=8)] * 3
    mixed = Engine(model, max_batch=4).generate([PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[3]],
                                                [others[0], others[1], p, others[2]])
    assert mixed[2].output == alone
    assert Engine(model, max_batch=1).generate([PROMPTS[2]], SamplingParams(temperature=1.0, seed=124, max_tokens=15))[0].output != alone


def _penalised_naive(model, prompt, n, repetition, presence, frequency):
    """Greedy decoding with vLLM's penalties, one token at a time: repetition over prompt and output,
    presence and frequency over the output."""
    seq, gen = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq]))[0, -1, :100].tolist()
            for t in range(100):
                if t in prompt or t in gen:
                    logits[t] = logits[t] / repetition if logits[t] > 0 else logits[t] * repetition
                c = gen.count(t)
                logits[t] -= frequency * c + (presence if c else 0.0)
            nxt = max(range(100), key=lambda t: logits[t])
            gen.append(nxt)
            seq.append(nxt)
    return gen


def test_penalised_greedy_equals_a_naive_loop(model):
    p = SamplingParams(temperature=0, max_tokens=12, repetition_penalty=1.5, presence_penalty=0.7, frequency_penalty=0.4)
    prompt = [3, 3, 4, 5]
    out = Engine(model, max_batch=2).generate([prompt, [1, 2]], [p, SamplingParams(temperature=0, max_tokens=3)])[0].output
    assert out == _penalised_naive(model, prompt, 12, 1.5, 0.7, 0.4)


def test_the_repetition_penalty_counts_the_prompts_tokens(model):
    """This prompt (PROMPTS[4]) holds the model's unpenalised greedy choice; a strong repetition
    penalty must move the first token off it (counting only the output would leave it there)."""
    prompt = PROMPTS[4]
    plain = greedy_alone(model, prompt, 1)[0]
    assert plain in prompt
    out = Engine(model, max_batch=1).generate([prompt], SamplingParams(temperature=0, max_tokens=6, repetition_penalty=100.0))[0].output
    assert out == _penalised_naive(model, prompt, 6, 100.0, 0.0, 0.0) and out[0] != plain


def test_stop_tokens_logprobs_and_finish_reasons(model):
    first = greedy_alone(model, PROMPTS[0], 4)
    engine = Engine(model, max_batch=2)
    stopped, full = engine.generate(
        [PROMPTS[0], PROMPTS[0]],
        [SamplingParams(temperature=0, max_tokens=4, stop_token_ids=(first[1],), logprobs=2),
         SamplingParams(temperature=0, max_tokens=4)],
    )
    assert stopped.output == first[:2] and stopped.finish_reason == "stop"
    assert full.output == first and full.finish_reason == "length"
    lp = stopped.logprobs[0]
    assert lp["token"] == first[0] and lp["top"][0] == (first[0], pytest.approx(lp["logprob"])) and len(lp["top"]) == 2


def test_text_stream_stop_strings_and_partial_characters():
    vocab = ["ab", "c", "EN", "D", "x", "\xe2", "\x82", "\xac"]  # the last three are the bytes of "€" in latin-1 clothing
    decode = lambda ids: b"".join(vocab[i].encode("latin-1") for i in ids).decode("utf-8", errors="replace")
    stream = TextStream(decode, stop=["END", "zz"])
    pieces = [stream.push(t) for t in [0, 1, 5, 6, 7, 2]]
    assert "".join(p for p, _ in pieces) == "abc€" and not any(hit for _, hit in pieces)
    assert pieces[2] == ("", False) and pieces[4] == ("€", False)  # no half characters; "EN" may start "END"
    assert stream.push(3) == ("", True) and stream.text == "abc€"
    stream = TextStream(decode, stop=["END"])
    [stream.push(t) for t in [0, 2]]
    assert stream.flush() == "EN" and stream.text == "abEN"


def test_stop_string_cuts_the_text(lm):
    prompt = lm.tokenizer.encode("ROMEO:")
    ref = Engine(lm.model, lm.tokenizer).generate([prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
    stop = ref.text[5:8]
    got = Engine(lm.model, lm.tokenizer).generate([prompt], SamplingParams(temperature=0, max_tokens=30, stop=(stop,), ignore_eos=True))[0]
    assert got.finish_reason == "stop" and got.text == ref.text[: ref.text.index(stop)]


def test_abort_frees_the_slot_and_errors(model):
    engine = Engine(model, max_batch=1, max_waiting=1)
    a = engine.add([1, 2], SamplingParams(temperature=0, max_tokens=40))
    engine.step()
    b = engine.add([3], SamplingParams(temperature=0, max_tokens=2))
    with pytest.raises(QueueFull):
        engine.add([4], SamplingParams(max_tokens=2))
    assert engine.abort(a.id) is a and a.finish_reason == "abort" and engine.running == 0
    while engine.has_work:
        engine.step()
    assert b.finish_reason == "length" and len(a.output) < 40
    with pytest.raises(UserError, match="exceed the context of 64"):
        engine.add(list(range(60)), SamplingParams(max_tokens=10))
    with pytest.raises(UserError, match="empty"):
        engine.add([], SamplingParams())


def test_encoder_decoder_is_refused():
    m = Transformer(preset("transformer-base", vocab_size=50, n_layer=1, n_encoder_layer=1, n_embd=32, n_head=2, mlp_hidden=64))
    with pytest.raises(UserError, match="decoder-only"):
        Engine(m)


def test_compiled_cpu_decode_equals_eager_and_writes_the_cache_in_place():
    """The compiled step (inductor's C++ wrapper on CPU) over all slots, with requests joining
    and leaving and the attended span switching between buckets: the same tokens as eager,
    written into the engine's own cache buffers, with no graph compiled after the warm-up, one
    for each span even where dynamo's recompile limit is lower (a long context has 10 spans)."""
    model = varied_transformer(3, position="rotary", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False, context_length=320)
    prompts = [*PROMPTS[:3], list(range(1, 90)) * 3, *PROMPTS[3:]]  # 267 tokens: past the first span bucket
    lengths = [12, 5, 20, 9, 3, 15, 7, 10]
    params = [SamplingParams(temperature=0, max_tokens=n) for n in lengths]
    eager = Engine(model, max_batch=3, prefill_chunk=16).generate(prompts, params)
    before = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(recompile_limit=1):  # (pytest's monkeypatch would delete the option on undo)
        engine = Engine(model, max_batch=3, prefill_chunk=16, compile=True)  # compiles the step here, not in a request
    assert engine.spans == [c.span for c in engine._spans] == span_buckets(320) == [256, 320]
    assert counters["stats"]["unique_graphs"] == before + 2
    buffers = [t.data_ptr() for t in engine.cache.k + engine.cache.v]
    graphs = counters["stats"]["unique_graphs"]
    compiled = engine.generate(prompts, params)
    assert counters["stats"]["unique_graphs"] == graphs  # the warm-up's graphs serve every step
    assert [r.output for r in compiled] == [r.output for r in eager]
    assert [t.data_ptr() for t in engine.cache.k + engine.cache.v] == buffers
    # The last request decoded up to position len(prompt) + len(output) - 2: its keys are in its slot.
    last = compiled[-1]
    assert last.slot is not None and engine.cache.k[0][last.slot, :, len(last.prompt) + len(last.output) - 2].abs().sum() > 0
    # The long request's freed slot keeps 275 tokens through steps over the 256-position span
    # (the compiled graph writes the free slot's row at position 255, which is put back), and its
    # next turn reuses all of them.
    long = compiled[3]
    kept = engine.kept[long.slot]
    assert kept == long.prompt + long.output[:-1]
    engine.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=5))
    alone = model.new_cache(1, 320)
    with torch.no_grad():
        model(torch.tensor([kept]), cache=alone)
    for t, ref in zip(engine.cache.k + engine.cache.v, alone.k + alone.v):
        torch.testing.assert_close(t[long.slot, :, : len(kept)], ref[0, :, : len(kept)], atol=1e-4, rtol=1e-4)
    turn, before = long.prompt + long.output + [5], engine.reused_tokens
    assert engine.generate([turn], SamplingParams(temperature=0, max_tokens=5))[0].output == greedy_alone(model, turn, 5)
    assert engine.reused_tokens - before == len(long.prompt) + len(long.output) - 1


# --- prefix reuse ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_model():
    return varied_transformer(4, context_length=160)


def test_a_chat_turn_reuses_the_previous_turn_from_its_freed_slot(long_model):
    """The next turn's prompt is the last prompt, its answer and a new message: only the answer's
    last token (whose key was never written) and the message are prefilled, in the same slot.
    Another conversation running beside it meanwhile takes the other slot."""
    engine = Engine(long_model, max_batch=3, prefill_chunk=16)
    first, other = engine.generate([list(range(1, 41)), [7, 7, 7]], [SamplingParams(temperature=0, max_tokens=10),
                                                                     SamplingParams(temperature=0, max_tokens=30)])
    assert engine.kept[first.slot] == first.prompt + first.output[:-1] and engine.reused_tokens == 0
    assert other.slot != first.slot
    turn = first.prompt + first.output + [11, 12, 13]
    second = engine.generate([turn], SamplingParams(temperature=0, max_tokens=8))[0]
    assert second.slot == first.slot and engine.reused_tokens == 49
    assert second.output == greedy_alone(long_model, turn, 8)
    off = Engine(long_model, max_batch=2, prefill_chunk=16, prefix_cache=False)
    off.generate([first.prompt], SamplingParams(temperature=0, max_tokens=10))
    assert off.generate([turn], SamplingParams(temperature=0, max_tokens=8))[0].output == second.output and off.reused_tokens == 0


def test_common_prefix_equals_a_plain_loop():
    import random

    rng = random.Random(0)
    for _ in range(2000):
        a = [rng.randrange(3) for _ in range(rng.randrange(0, 200))]
        b = a[: rng.randrange(0, len(a) + 1)] + [rng.randrange(3) for _ in range(rng.randrange(0, 200))]
        limit = rng.randrange(0, 250)
        n = 0
        while n < min(len(a), len(b), limit) and a[n] == b[n]:
            n += 1
        assert _common_prefix(a, b, limit) == n


def test_eager_requests_one_at_a_time_keep_to_the_lowest_slot(long_model):
    """An eager step runs every slot up to the highest running one: a lone request in slot 3
    would cost four rows a step, so kept keys in slot 0 give way unless the prompt reuses them."""
    engine = Engine(long_model, max_batch=4)
    slots = [engine.generate([[i, i + 1]], SamplingParams(temperature=0, max_tokens=2))[0].slot for i in range(1, 5)]
    assert slots == [0, 0, 0, 0]


def test_requests_sharing_a_prefix_prefill_it_once(long_model):
    """Three prompts with one 32-token system prefix arrive together: the first prefills it in
    chunks of 16, the others wait a step for each chunk and copy it (2 x 32 tokens reused)."""
    system = [(5 * i) % 97 + 1 for i in range(32)]
    prompts = [system + [40 + j, 41, 42, 43] for j in range(3)]
    engine = Engine(long_model, max_batch=3, prefill_chunk=16, prefill_budget=48)
    reqs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=6))
    assert engine.reused_tokens == 64
    assert [r.output for r in reqs] == [greedy_alone(long_model, p, 6) for p in prompts]
    # n = 3 copies of one 40-token prompt: the two others copy its first two chunks and prefill
    # the last 8 tokens themselves (fewer than MIN_REUSE would come from waiting another step).
    engine = Engine(long_model, max_batch=3, prefill_chunk=16, prefill_budget=48)
    seeded = [SamplingParams(temperature=1.0, max_tokens=6, seed=s) for s in (1, 2, 3)]
    reqs = engine.generate([prompts[0] + [50, 51, 52, 53]] * 3, seeded)
    assert engine.reused_tokens == 64
    alone = [Engine(long_model, max_batch=1).generate([prompts[0] + [50, 51, 52, 53]], p)[0].output for p in seeded]
    assert [r.output for r in reqs] == alone and len({tuple(a) for a in alone}) > 1


def test_a_free_slot_keeps_its_keys_through_decode_steps_that_attend_over_fewer(long_model):
    """An eager decode step runs the slots below the highest decoding one; a free slot among them
    that keeps more tokens than the step attends over (16 here) writes at the last attended
    position, whose key and value the engine puts back after the step."""
    engine = Engine(long_model, max_batch=2, prefill_chunk=64)
    first = engine.add(list(range(1, 41)), SamplingParams(temperature=0, max_tokens=4))
    engine.add([3, 1, 4], SamplingParams(temperature=0, max_tokens=12))  # slot 1, positions up to 14
    while not first.finished:
        engine.step()
    assert len(engine.kept[0]) == 43
    before = [t[0].clone() for t in engine.cache.k + engine.cache.v]
    while engine.has_work:
        engine.step()
    assert all(torch.equal(t[0], b) for t, b in zip(engine.cache.k + engine.cache.v, before))
    turn = first.prompt + first.output + [9]
    again = engine.generate([turn], SamplingParams(temperature=0, max_tokens=6))[0]
    assert again.slot == 0 and engine.reused_tokens == 43 and again.output == greedy_alone(long_model, turn, 6)


def test_span_buckets_double_up_to_the_context():
    assert span_buckets(100) == [100]
    assert span_buckets(256) == [256]
    assert span_buckets(2048) == [256, 512, 1024, 2048]
    assert span_buckets(3000, smallest=1024) == [1024, 2048, 3000]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the compiled step is captured in CUDA graphs")
@pytest.mark.parametrize("graphs", ["capture", "trees"])
def test_compiled_cuda_graph_decode_equals_eager(graphs):
    """Both ways of replaying the compiled step in CUDA graphs, over two span buckets (a cache of
    300 positions: spans 256 and 300) and with slots joining and leaving, give eager's tokens."""
    model = varied_transformer(2, context_length=512).to("cuda")
    params = SamplingParams(temperature=0, max_tokens=12)
    eager = Engine(model, max_batch=4, max_seq_len=300).generate(PROMPTS[:6], params)
    engine = Engine(model, max_batch=4, max_seq_len=300, compile=True, graphs=graphs)
    assert engine.spans == [256, 300]
    compiled = engine.generate(PROMPTS[:6], params)
    assert [r.output for r in compiled] == [r.output for r in eager]
    long = [[(7 * i) % 100 for i in range(259)]]  # decodes past position 256: the second graph
    alone = Engine(model, max_batch=4, max_seq_len=300).generate(long, params)
    assert [r.output for r in engine.generate(long, params)] == [r.output for r in alone]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the verify step is captured in CUDA graphs")
def test_captured_verify_step_speculates_like_eager():
    """The compiled verify step (speculate + 1 tokens a slot), captured in CUDA graphs, keeps the
    greedy tokens of eager decoding, and accepts drafts."""
    model = varied_transformer(5, context_length=512).to("cuda")
    params = SamplingParams(temperature=0, max_tokens=24)
    prompts = [[1, 2, 3, 1, 2, 3, 1], [9, 8, 9, 8], [(5 * i) % 50 for i in range(40)], [4, 4, 4, 4]]
    eager = Engine(model, max_batch=3, max_seq_len=300).generate(prompts, params)
    engine = Engine(model, max_batch=3, max_seq_len=300, compile=True, speculate=4)
    assert [r.output for r in engine.generate(prompts, params)] == [r.output for r in eager]
    assert engine.accepted > 0


def test_prefill_together_with_padding_equals_alone(model):
    """Neighbouring slots prefill in one padded forward; near the end of the cache they fall back to one at a time."""
    prompts = [list(range(1, 30)), [3, 1, 4], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4], [9, 9]]
    engine = Engine(model, max_batch=4, prefill_chunk=8, prefill_budget=64)
    reqs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=6))
    assert [r.output for r in reqs] == [greedy_alone(model, p, 6) for p in prompts]
    # A long prompt that has reached the end of a short cache, then a new one beside it: the padded
    # forward would run past the cache, so they prefill one at a time.
    engine = Engine(model, max_batch=2, max_seq_len=31, prefill_chunk=8, prefill_budget=16)
    a = engine.add(list(range(1, 31)), SamplingParams(temperature=0, max_tokens=1))
    for _ in range(3):
        engine.step()
    assert a.prefilled == 24
    b = engine.add(list(range(40, 49)), SamplingParams(temperature=0, max_tokens=3))
    while engine.has_work:
        engine.step()
    assert a.output == greedy_alone(model, a.prompt, 1) and b.output == greedy_alone(model, b.prompt, 3)


def test_text_stream_decodes_incrementally_to_the_whole_text(lm):
    """Each push decodes only the last tokens; the text is still that of decoding everything."""
    torch.manual_seed(0)
    ids = torch.randint(0, lm.tokenizer.vocab_size, (300,)).tolist()
    stream = TextStream(lm.tokenizer.decode)
    text = "".join(stream.push(t)[0] for t in ids) + stream.flush()
    assert text == lm.tokenizer.decode(ids)
    # A decoder that drops the leading space of a text (SentencePiece's "▁"): the context token keeps it.
    words = [" the", " cat", "s", " sat"]
    decode = lambda ids: "".join(words[i] for i in ids).removeprefix(" ")
    stream = TextStream(decode)
    assert "".join(stream.push(t)[0] for t in [0, 1, 2, 3, 1]) == "the cats sat cat"
    # After a prompt, the output's first space stays (vLLM's " Paris"): prompt text + output text is
    # the text of the whole sequence, and the output's tokens' bytes (logprob offsets) spell it.
    stream = TextStream(decode, stop=["zz"], context=[3, 1, 1, 1, 1])
    out = [stream.push(t)[0] for t in [0, 1, 2]]
    assert out == [" the", " cat", "s"] and stream.flush() == "" and decode([3, 1, 1, 1, 1]) + stream.text == decode([3, 1, 1, 1, 1, 0, 1, 2])
    # A prompt that ends inside a character (token ids cut through an emoji) is no context: the output completes it.
    utf8 = [b"\xf0\x9f", b"\x99\x82", b" ok"]
    decode = lambda ids: b"".join(utf8[i] for i in ids).decode("utf-8", "replace")
    stream = TextStream(decode, context=[0])
    assert [stream.push(t)[0] for t in [1, 2]] == ["\U0001f642", " ok"]


def test_cache_size_is_checked_and_max_seq_len_caps_requests(model):
    with pytest.raises(UserError, match=r"KV cache for 1000000000 sequences .* GiB is free; lower max_batch"):
        Engine(model, max_batch=10**9)
    with pytest.raises(UserError, match="max_seq_len >= 2"):
        Engine(model, max_seq_len=1)
    engine = Engine(model, max_batch=2, max_seq_len=16)
    assert engine.cache.k[0].shape[2] == 16 and engine.cache_bytes == sum(t.nbytes for t in engine.cache.k + engine.cache.v)
    with pytest.raises(UserError, match="exceed the context of 16"):
        engine.add([1, 2, 3], SamplingParams(max_tokens=14))
    assert len(engine.generate([[1, 2, 3]], SamplingParams(max_tokens=13, temperature=0))[0].output) == 13


def test_prompt_logprobs_equal_a_full_forward_and_max_tokens_0_only_scores(long_model):
    """Prompt log-probabilities through chunked, batched prefill equal one forward of the whole
    prompt; a scoring request computes every position even when a slot holds its prefix (the
    second run), and with max_tokens 0 ends after its prefill with no output."""
    system = [(5 * i) % 97 + 1 for i in range(32)]
    prompts = [system + [40, 41, 42, 43], system + [60, 61], [3, 1, 4, 1, 5]]
    engine = Engine(long_model, max_batch=3, prefill_chunk=16, prefill_budget=48)
    for _ in range(2):
        reqs = engine.generate(prompts, [SamplingParams(temperature=0, max_tokens=0, prompt_logprobs=3),
                                         SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=0),
                                         SamplingParams(temperature=0, max_tokens=0, prompt_logprobs=2)])
        assert engine.reused_tokens == 0 and engine.running == 0
        for req, prompt in zip(reqs, prompts):
            with torch.no_grad():
                logp = torch.log_softmax(long_model(torch.tensor([prompt]))[0, :-1, :100].float(), dim=-1)
            want = logp.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
            assert [e["token"] for e in req.prompt_logprobs] == prompt[1:]
            torch.testing.assert_close(torch.tensor([e["logprob"] for e in req.prompt_logprobs]), want, atol=1e-4, rtol=0)
            k = req.params.prompt_logprobs
            top = logp.topk(k, dim=-1) if k else None
            for i, e in enumerate(req.prompt_logprobs):
                assert [t for t, _ in e["top"]] == (top.indices[i].tolist() if k else [])
        assert [r.output for r in reqs] == [[], greedy_alone(long_model, prompts[1], 2), []]
        assert [r.finish_reason for r in reqs] == ["length"] * 3
    # A request without prompt_logprobs still reuses the prefix the scoring ones left behind.
    engine.generate([system + [70, 71]], SamplingParams(temperature=0, max_tokens=1))
    assert engine.reused_tokens >= 16
