"""The streamed postprocess against a naive transcription of the official one, on random outputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dicom_node.model.postprocess import postprocess, select_candidates
from dicom_node.model.preprocess import target_size

HUMAN = 20


def official_postprocess(logits, masks, padded_hw, resized_hw, original_hw):
    """M2FP.postprocess + pipeline cuts as the fixture README describes them: all 100 masks upsampled."""
    full = F.interpolate(masks[None], size=padded_hw, mode="bilinear", align_corners=False)
    full = full[:, :, : resized_hw[0], : resized_hw[1]]
    full = F.interpolate(full, size=original_hw, mode="bilinear", align_corners=False)[0]
    binary = (full > 0).float()
    mask_score = (full.sigmoid().flatten(1) * binary.flatten(1)).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    probs = F.softmax(logits, -1)[:, :-1]
    k = probs.shape[1]
    values, index = probs.flatten().topk(100, sorted=False)
    kept = {}
    for p, idx in zip(values.tolist(), index.tolist(), strict=True):
        q, c = divmod(idx, k)
        score = p * float(mask_score[q])
        if (c == HUMAN and score > 0.1) or (c not in (0, HUMAN) and score >= 0.1):
            kept[(q, c)] = (score, (full[q] > 0).numpy())
    return kept


@pytest.mark.parametrize("original_hw", [(384, 512), (64, 48), (1000, 333), (640, 640)])
def test_streamed_postprocess_equals_naive_official(original_hw) -> None:
    gen = torch.Generator().manual_seed(sum(original_hw))
    resized_hw = target_size(*original_hw)
    padded_hw = tuple(-(-s // 32) * 32 for s in resized_hw)
    q = 100
    logits = torch.randn(q, 22, generator=gen) * 4
    masks = torch.randn(q, padded_hw[0] // 4, padded_hw[1] // 4, generator=gen)
    masks = F.avg_pool2d(masks[None], 5, 1, 2)[0] * 6 - 1  # smooth blobs, some queries empty
    masks[:10] = -5.0  # queries with no positive pixel at all
    ref = official_postprocess(logits, masks, padded_hw, resized_hw, original_hw)
    out = postprocess(logits, masks, padded_hw, resized_hw, original_hw, HUMAN)
    ours = {(i.query_index, i.class_id): i for i in out.parts + out.humans}
    assert set(ours) == set(ref)
    assert len(ref) > 3  # the case is not trivial
    for key, (score, _mask) in ref.items():
        assert ours[key].score == pytest.approx(score, rel=1e-5, abs=1e-7)
    for inst, mask in zip(out.humans, out.human_masks, strict=True):
        np.testing.assert_array_equal(mask, ref[(inst.query_index, inst.class_id)][1])
    for inst in out.parts:
        np.testing.assert_array_equal(out.upsampler.full_mask(inst.query_index),
                                      ref[(inst.query_index, inst.class_id)][1])
    expected = np.zeros(original_hw, np.uint8)
    for (_, c), (_, mask) in sorted(((k, v) for k, v in ref.items() if k[1] != HUMAN), key=lambda kv: kv[1][0]):
        expected[mask] = c
    np.testing.assert_array_equal(out.label_map, expected)


def test_cuts_are_ge_for_parts_and_gt_for_humans() -> None:
    logits = torch.full((3, 22), -50.0)
    logits[0, 5] = 10.0  # a part with prob ~1
    logits[1, HUMAN] = 10.0
    logits[2, 0] = 10.0  # Background: never returned
    cands = select_candidates(logits, HUMAN)
    assert [(c.query_index, c.class_id) for c in cands] == [(0, 5), (1, HUMAN)]


@pytest.mark.parametrize("original_hw", [(3000, 4000), (500, 377), (853, 640)])
def test_window_logits_are_the_photo_size_logits_bit_for_bit(original_hw) -> None:
    from dicom_node.model.postprocess import MaskUpsampler

    gen = torch.Generator().manual_seed(original_hw[1])
    resized_hw = target_size(*original_hw)
    padded_hw = tuple(-(-s // 32) * 32 for s in resized_hw)
    masks = torch.randn(3, padded_hw[0] // 4, padded_hw[1] // 4, generator=gen) * 5
    up = MaskUpsampler(masks, padded_hw, resized_hw, original_hw)
    resized = up.resized([0, 1, 2])
    full = up.photo_size(resized)
    h, w = original_hw
    windows = [(slice(0, h), slice(0, w)), (slice(h // 3, h // 2), slice(w // 5, w - 7)),
               (slice(h - 1, h), slice(0, 1)), (slice(1, h - 2), slice(3, w)), (slice(0, 7), slice(0, w))]
    for i, win in enumerate(windows):
        shape = (win[0].stop - win[0].start, win[1].stop - win[1].start)
        got = up.window_logits(resized[i % 3], win)
        assert torch.equal(got, full[i % 3][win]), win
        # with a buffer: the periodic row pass (tap_period) where the height has one
        buffered = up.window_logits(resized[i % 3], win, out=torch.full(shape, float("nan")),
                                    scratch=torch.empty(shape))
        assert torch.equal(buffered, full[i % 3][win]), win


@pytest.mark.parametrize(("out_size", "in_size"), [(3000, 640), (768, 640), (3024, 640), (1536, 640), (1280, 640)])
def test_periodic_row_pass_is_the_gathered_one_bit_for_bit(out_size, in_size) -> None:
    """_lerp_rows (strided views, one phase of the tap period at a time) against _lerp (gathers),
    on windows that start at the clamped first rows, end at the last, and are shorter than two periods."""
    from dicom_node.model.postprocess import _lerp, _lerp_rows, linear_axis, tap_period

    period = tap_period(out_size, in_size)
    assert period is not None and period[0] == out_size // math.gcd(out_size, in_size)
    gen = torch.Generator().manual_seed(out_size)
    src = torch.randn(in_size, 37, generator=gen) * 4
    axis = linear_axis(out_size, in_size)
    for rows in [slice(0, out_size), slice(0, out_size // 3), slice(out_size // 2, out_size), slice(5, 5 + period[0])]:
        part = axis.part(rows)
        top = int(part.i0[0])
        bottom = int(part.i1[-1]) + 1
        want = _lerp(src[top:bottom], part.shifted(top), 0)
        got = _lerp_rows(src[top:bottom].contiguous(), part.shifted(top), torch.full(want.shape, float("nan")), period)
        assert torch.equal(got, want), rows
    # a batch of queries (k, S, W), as MaskUpsampler.resized runs it
    batch = torch.randn(3, in_size, 37, generator=gen)
    want = _lerp(batch, axis, 1)
    got = _lerp_rows(batch, axis, torch.full(want.shape, float("nan")), period)
    assert torch.equal(got, want)
    assert tap_period(643, 640) is None  # no period shorter than the photo: gathers as before


def _load_bench():
    """scripts/bench_postprocess.py: holds OLD, the exact postprocess before issue 17, verbatim."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "bench_postprocess.py"
    spec = importlib.util.spec_from_file_location("bench_postprocess", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load_bench()


@pytest.mark.parametrize("size", ["512x384", "48x64", "333x1000", "640x640", "1024x768", "4000x3000"])
def test_new_postprocess_gives_the_old_bits(bench, size) -> None:
    """Issue 17: the fast exact postprocess changes no output bit (scores compared as floats, not approx)."""
    inp = bench.synthetic_inputs(size, seed=len(size))
    old, new = bench.run(bench.old_postprocess, inp), bench.run(postprocess, inp)
    # a photo larger than the network input takes _lerp (this build's bilinear arithmetic); a smaller
    # one keeps F.interpolate
    enlarging = all(o >= r for o, r in zip(inp["original_hw"], inp["resized_hw"], strict=True))
    assert new.upsampler.explicit == enlarging
    assert enlarging == (size in ("640x640", "1024x768", "4000x3000"))
    assert len(new.parts) > 3
    bench.assert_identical(old, new, check_part_masks=size != "4000x3000")
    if size == "4000x3000":  # a few part masks at 12 MP (each OLD one is a full F.interpolate)
        for part in new.parts[:3]:
            np.testing.assert_array_equal(old.upsampler.full_mask(part.query_index),
                                          new.upsampler.full_mask(part.query_index))


def test_interpolate_fallback_and_in_order_painting_give_the_old_bits(bench, monkeypatch) -> None:
    """Where _lerp's bits are not confirmed the code uses F.interpolate; where two classes share a
    label-key bucket it paints in keep order. Both give the same bits as OLD."""
    from dicom_node.model import postprocess as pp

    inp = bench.synthetic_inputs("333x1000", seed=3)
    old = bench.run(bench.old_postprocess, inp)
    monkeypatch.setattr(pp, "explicit_is_exact", lambda out_hw, in_hw: False)
    monkeypatch.setattr(pp, "CLASS_BITS", 22)  # buckets 2**22 ulps wide: classes collide
    new = bench.run(pp.postprocess, inp)
    assert not new.upsampler.explicit
    bench.assert_identical(old, new)


def test_label_keys_order_as_float32_scores() -> None:
    from dicom_node.model.postprocess import CLASS_BITS, label_key

    scores = np.sort(np.random.default_rng(0).uniform(0.1, 1.0, 1000))
    keys = [label_key(float(s), 19) for s in scores]
    assert keys == sorted(keys)
    assert all(int(np.float32(k).view(np.int32)) & ((1 << CLASS_BITS) - 1) == 19 for k in keys)
    assert label_key(0.5, 3) < label_key(0.5 * (1 + 1e-4), 1)


@pytest.mark.parametrize("out_hw,in_hw", [((3000, 4000), (640, 853)), ((768, 1024), (640, 853)),
                                          ((640, 864), (160, 216)), ((853, 640), (213, 160))])
def test_explicit_bilinear_is_interpolate_bit_for_bit(out_hw, in_hw) -> None:
    from dicom_node.model.postprocess import _lerp, explicit_is_exact, linear_axis

    gen = torch.Generator().manual_seed(in_hw[1])
    src = torch.randn(*in_hw, generator=gen) * 6
    want = F.interpolate(src[None, None], size=out_hw, mode="bilinear", align_corners=False)[0, 0]
    got = _lerp(_lerp(src, linear_axis(out_hw[1], in_hw[1]), 1), linear_axis(out_hw[0], in_hw[0]), 0)
    # The fast path is taken only where its start-up self-check found it exact on this CPU's ATen
    # kernels (AVX2 and AVX-512 builds may round differently): the check must tell the truth.
    assert explicit_is_exact(out_hw, in_hw) == torch.equal(got, want)
    if "avx512" in torch.backends.cpu.get_cpu_capability().lower():
        assert torch.equal(got, want), "exact on the AVX-512 machine where it was measured"


def test_shrinking_keeps_interpolate() -> None:
    from dicom_node.model.postprocess import explicit_is_exact

    assert not explicit_is_exact((64, 48), (853, 640))


def test_equal_scores_of_two_classes_paint_as_the_official_order(bench) -> None:
    """Two parts of different classes with the same float32 score (bf16 networks give such ties)
    share a label-key bucket: their pixels are decided in keep order, as OLD does."""
    inp = bench.synthetic_inputs("1024x768", seed=5)
    logits, masks = inp["pred_logits"].clone(), inp["pred_masks"].clone()
    src = int(torch.nonzero(masks.flatten(1).amax(1) > 1).flatten()[-1])  # a query with positive logits
    dst = (src + 1) % logits.shape[0]
    top = int(logits[src, 1:-2].argmax()) + 1  # its best part class (not Background, human or no-object)
    other = top % (logits.shape[1] - 3) + 1
    logits[src, top] = logits[dst, top] = 12.0  # probability ~1 for that class: surely kept
    logits[dst] = logits[src]
    logits[dst, [top, other]] = logits[src, [other, top]]  # the same probability, another class
    masks[dst] = masks[src]
    inp = {**inp, "pred_logits": logits, "pred_masks": masks}
    old, new = bench.run(bench.old_postprocess, inp), bench.run(postprocess, inp)
    tied = [p for p in new.parts if p.query_index in (src, dst)]
    assert {p.class_id for p in tied} == {top, other} and len({p.score for p in tied}) == 1
    bench.assert_identical(old, new)


@pytest.fixture()
def two_threads():
    """The node's default on these 2-core machines; restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_one_thread_reproduces_the_threaded_sigmoid_and_sum(two_threads) -> None:
    """The parallel postprocess rests on this: chunk by chunk on one intra-op thread, the sigmoid
    and the sum give the two-thread bits, on inputs whose sigmoid depends on the loop that
    computes it; a chunk boundary 32 elements off gives other bits, and the check says so."""
    from dicom_node.model import postprocess as pp

    assert pp.reductions_reproducible(2)
    differs = pp._scalar_sigmoid_differs(torch.Generator().manual_seed(7))
    assert differs.numel() > 100
    own_sums_differ = []
    for n in (70_001, 1_234_567, 12_000_039):  # thread 0's chunk ends in a scalar tail of 25, 4 and 20
        x = differs.repeat(n // differs.numel() + 1)[:n].clone()
        x[::5] = float("-inf")
        want = x.clone().sigmoid_()
        want_sum = float(want.sum())  # on two threads
        with pp.one_intra_op_thread():
            assert torch.get_num_threads() == 1
            emulated = pp.Reductions(2, emulate=True)
            got = emulated.sigmoid_(x.clone())
            assert torch.equal(got, want)
            assert emulated.sum(got) == want_sum
            own_sums_differ.append(float(got.sum()) != want_sum)
            shifted = x.clone()  # thread 0's chunk 32 elements longer than ATen's
            half = -(-n // 2) + 32
            shifted[:half].sigmoid_()
            shifted[half:].sigmoid_()
            assert not torch.equal(shifted, want)
    assert any(own_sums_differ)  # one thread's own sum is not the two threads': the emulation matters
    assert torch.get_num_threads() == 2


def test_a_wrong_split_is_caught_and_the_postprocess_stays_sequential(two_threads, monkeypatch) -> None:
    from dicom_node.model import postprocess as pp

    pp.reductions_reproducible.cache_clear()
    monkeypatch.setattr(pp, "thread_chunks", lambda n, threads: [(0, n // 2 + 32), (n // 2 + 32, n)])
    try:
        assert not pp.reductions_reproducible(2)
    finally:
        pp.reductions_reproducible.cache_clear()


@pytest.mark.parametrize("size", ["333x1000", "1024x768", "4000x3000"])
def test_queries_in_parallel_give_the_sequential_bits(bench, two_threads, monkeypatch, size) -> None:
    """The same outputs, bit for bit, whether queries run one after another on two intra-op
    threads or two at a time on one each; the intra-op thread count is restored."""
    from dicom_node.model import postprocess as pp

    inp = bench.synthetic_inputs(size, seed=11)
    calls = []
    real_run_pass = pp._run_pass
    monkeypatch.setattr(pp, "_run_pass", lambda work, parallel: calls.append(parallel) or real_run_pass(work, parallel))
    parallel = bench.run(pp.postprocess, inp)
    assert calls == [True, True] and torch.get_num_threads() == 2
    monkeypatch.setattr(pp, "reductions_reproducible", lambda threads: False)
    sequential = bench.run(pp.postprocess, inp)
    assert calls[2:] == [False, False]
    assert len(parallel.parts) > 3
    bench.assert_identical(sequential, parallel, check_part_masks=False)


def test_an_error_inside_a_worker_restores_the_thread_count(bench, two_threads, monkeypatch) -> None:
    from dicom_node.model import postprocess as pp

    def broken(self, resized, win, buffers):
        assert torch.get_num_threads() == 1  # inside a worker
        raise MemoryError("no room for the window")

    monkeypatch.setattr(pp._Pass, "_mask_score", broken)
    with pytest.raises(MemoryError):
        bench.run(pp.postprocess, bench.synthetic_inputs("1024x768", seed=3))
    assert torch.get_num_threads() == 2


@pytest.fixture()
def aten_path(monkeypatch):
    """The exact postprocess without the fused window kernel (a node without a C compiler)."""
    from dicom_node.model import window_kernel

    monkeypatch.setenv(window_kernel.DISABLE_ENV, "1")
    window_kernel.kernel.cache_clear()
    yield
    monkeypatch.delenv(window_kernel.DISABLE_ENV)
    window_kernel.kernel.cache_clear()


def test_the_window_kernel_is_built_here_and_checked_exact() -> None:
    """The test machines have a C compiler (scripts/setup.sh --test installs gcc), so the fused path
    is the one the other tests of this file run; its start-up check passes on this CPU."""
    from dicom_node.model import postprocess as pp
    from dicom_node.model import window_kernel

    assert window_kernel.kernel() is not None
    assert pp.native_is_exact()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("path", ["scored", "banded"])
@pytest.mark.parametrize("size", ["1024x768", "4000x3000"])
def test_the_window_kernel_gives_the_aten_paths_bits(bench, request, monkeypatch, caplog, size, path,
                                                    threads) -> None:
    """Kernel on, in one pass (the default here) or in slices with ATen's sigmoid, and off: the same
    kept instances, masks and label map, with one intra-op thread and with two (queries in parallel);
    the path a worker takes is logged once."""
    from dicom_node.model import postprocess as pp

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    request.addfinalizer(lambda: torch.set_num_threads(before))
    pp._kernel_path.cache_clear()
    request.addfinalizer(pp._kernel_path.cache_clear)
    inp = bench.synthetic_inputs(size, seed=21)
    if path == "banded":
        monkeypatch.setattr(pp, "scored_is_exact", lambda threads, emulate: False)
    caplog.set_level("INFO", logger="dicom_node.model.postprocess")
    paths: list[str] = []
    real = pp._Pass._mask_score
    monkeypatch.setattr(pp._Pass, "_mask_score", lambda self, *a: (lambda r: paths.append(r[2]) or r)(real(self, *a)))
    fused = bench.run(postprocess, inp)
    assert fused.upsampler.kernel is not None
    assert paths and set(paths) == {path}
    logged = [r.getMessage() for r in caplog.records if "event=postprocess.kernel" in r.getMessage()]
    expected = f"status=ready path={'one-pass' if path == 'scored' else 'slices'} threads={threads}"
    assert len(logged) == 1 and expected in logged[0]
    request.getfixturevalue("aten_path")
    aten = bench.run(postprocess, inp)
    assert aten.upsampler.kernel is None
    assert len(aten.parts) > 3
    bench.assert_identical(aten, fused, check_part_masks=size != "4000x3000")


@pytest.mark.parametrize("threads,emulate", [(1, False), (2, True)])
def test_one_window_from_the_kernel_equals_the_aten_window(bench, threads, emulate) -> None:
    """At 12 MP, three windows: positive count, 0/1 bytes and the sigmoid's sum from both kernel
    paths equal the ATen path's (window_logits, threshold, Reductions), bit for bit."""
    from dicom_node.model.postprocess import MaskUpsampler, Reductions, _Buffers, one_intra_op_thread

    inp = bench.synthetic_inputs("4000x3000", seed=4)
    up = MaskUpsampler(inp["pred_masks"], inp["padded_hw"], inp["resized_hw"], inp["original_hw"])
    assert up.kernel is not None
    reductions = Reductions(threads, emulate)
    checked = 0
    with one_intra_op_thread():
        for q in range(inp["pred_masks"].shape[0]):
            resized = up.resized([q])[0]
            win = up.window(resized > 0)
            if win is None:
                continue
            logits = up.window_logits(resized, win).contiguous()
            positive = logits > 0
            F.threshold(logits, 0.0, float("-inf"), inplace=True)
            want_sum = reductions.sum(reductions.sigmoid_(logits.view(-1)))
            for found in (up.scored_window(resized, win, _Buffers(), reductions),
                          up.banded_window(resized, win, _Buffers(), reductions)):
                assert found is not None
                count, total, mask = found
                assert count == int(positive.sum())
                assert np.float32(total).tobytes() == np.float32(want_sum).tobytes()
                assert torch.equal(mask.bool(), positive)
            checked += 1
            if checked == 3:
                break
    assert checked == 3


def test_nan_logits_take_the_aten_path_and_give_what_it_gives(bench, request, monkeypatch) -> None:
    """A network that returns NaN inside a drawn window: the kernel reports it and the ATen path
    decides, as it did before the kernel (the NaN count reaches int(): an error the worker reports)."""
    from dicom_node.model import window_kernel

    inp = bench.synthetic_inputs("1024x768", seed=8)
    masks = inp["pred_masks"].clone()
    q = next(c.query_index for c in select_candidates(inp["pred_logits"], inp["human_class"])
             if bool((masks[c.query_index] > 0).any()))
    y, x = (masks[q] > 0).nonzero()[0].tolist()
    masks[q, y, x] = float("nan")  # inside the window of a query that is drawn
    inp = {**inp, "pred_masks": masks}
    seen = []
    real = window_kernel.WindowKernel.window_score
    monkeypatch.setattr(window_kernel.WindowKernel, "window_score",
                        lambda self, *a: seen.append(real(self, *a)) or seen[-1])
    with pytest.raises(ValueError, match="NaN") as fused:
        bench.run(postprocess, inp)
    assert any(nans > 0 for _, nans, _ in seen)  # the kernel met the NaN and handed over
    request.getfixturevalue("aten_path")
    with pytest.raises(ValueError, match="NaN") as aten:
        bench.run(postprocess, inp)
    assert str(fused.value) == str(aten.value)


def test_a_kernel_that_rounds_otherwise_is_refused(monkeypatch) -> None:
    """The start-up check can fail: the same kernel fed the two source rows the other way round
    (a different but plausible arithmetic) is not trusted, and the postprocess keeps ATen's path."""
    from dicom_node.model import postprocess as pp
    from dicom_node.model import window_kernel

    real = window_kernel.kernel()
    assert real is not None

    class Swapped(window_kernel.WindowKernel):
        def window_band(self, src, cols, rows, span, scratch, out, positive):
            i0, i1, w0, w1 = rows
            return super().window_band(src, cols, (i1, i0, w1, w0), span, scratch, out, positive)

    monkeypatch.setattr(window_kernel, "kernel", lambda: Swapped(real.library))
    pp.native_is_exact.cache_clear()
    pp.scored_is_exact.cache_clear()
    try:
        assert not pp.native_is_exact()
        assert not pp.scored_is_exact(1, False)
        up = pp.MaskUpsampler(torch.randn(3, 160, 216), (640, 864), (640, 853), (768, 1024))
        assert up.explicit and up.kernel is None
    finally:
        pp.native_is_exact.cache_clear()
        pp.scored_is_exact.cache_clear()


def test_the_kernels_cascade_is_atens_sum_bit_for_bit() -> None:
    """The banded score rests on this: the kernel's emulation of ATen's one-thread sum, fed in
    pieces of any length, equals torch.sum on one thread, at sizes around every level of its
    cascade; a plain float32 running sum does not (so the comparison can fail)."""
    from dicom_node.model import window_kernel

    kern = window_kernel.kernel()
    assert kern is not None
    gen = torch.Generator().manual_seed(17)
    state = kern.new_sum()
    running_differs = 0
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sizes = [1, 7, 8, 9, 31, 32, 33, 100, 511, 512, 513, 4097, 32 * 16 * 16 + 5, 65_536 + 13, 1 << 20,
                 3_000_017, 12_000_039, 17_000_001]
        for n in sizes + torch.randint(1, 5_000_000, (12,), generator=gen).tolist():
            x = torch.rand(n, generator=gen)
            x[torch.rand(n, generator=gen) < 0.4] = 0
            want = float(x.sum())
            for piece in (n, 4096, 1000, 262_144 + 32):
                kern.start_sum(state, n)
                for f in range(0, n, piece):
                    kern.feed_sum(state, x[f:f + piece])
                assert kern.finish_sum(state) == want, (n, piece)
            running_differs += float(np.cumsum(x.numpy(), dtype=np.float32)[-1]) != want
        zero_pieces = 0
        for n in (5_000, 1 << 20, 3_000_017):  # runs of zeros fed without reading them
            x = torch.rand(n, generator=gen)
            runs = torch.randint(1, 200_000, (n // 1000,), generator=gen).cumsum(0)
            for a, b in zip(runs[::2].tolist(), runs[1::2].tolist(), strict=False):
                x[a:b] = 0
            kern.start_sum(state, n)
            f = 0
            while f < n:
                stop = min(n, f + int(torch.randint(1, 20_000, (1,), generator=gen)))
                if bool((x[f:stop] == 0).all()):
                    kern.feed_zeros(state, stop - f)
                    zero_pieces += 1
                else:
                    kern.feed_sum(state, x[f:stop])
                f = stop
            assert kern.finish_sum(state) == float(x.sum()), n
        assert zero_pieces > 10
        kern.start_sum(state, 100)
        kern.feed_sum(state, x[:99])
        assert math.isnan(kern.finish_sum(state))  # fewer elements than announced: no sum
    finally:
        torch.set_num_threads(before)
    assert running_differs > 10


def test_the_banded_check_catches_a_wrong_slice_or_sum(monkeypatch) -> None:
    """banded_is_exact can fail: slices that do not start a multiple of the vector loop's step after
    their chunk (the sigmoid's scalar tail moves), or a plain running sum instead of ATen's."""
    from dicom_node.model import postprocess as pp
    from dicom_node.model import window_kernel

    pp.banded_is_exact.cache_clear()
    try:
        assert pp.banded_is_exact(1, False)
        pp.banded_is_exact.cache_clear()
        monkeypatch.setattr(pp, "BAND", (1 << 18) + 8)
        assert not pp.banded_is_exact(1, False)
        monkeypatch.undo()
        pp.banded_is_exact.cache_clear()
        sums: dict[int, np.float32] = {}

        def running(self, state, piece):
            sums[id(state)] = np.float32(sums.get(id(state), np.float32(0)) + piece.numpy().sum(dtype=np.float32))

        monkeypatch.setattr(window_kernel.WindowKernel, "start_sum", lambda self, state, n: sums.pop(id(state), None))
        monkeypatch.setattr(window_kernel.WindowKernel, "feed_sum", running)
        monkeypatch.setattr(window_kernel.WindowKernel, "finish_sum", lambda self, state: float(sums[id(state)]))
        assert not pp.banded_is_exact(1, False)
        assert not pp.banded_is_exact(2, False)  # threads without the emulation: never
    finally:
        pp.banded_is_exact.cache_clear()


def test_the_kernels_sigmoid_is_atens_on_positive_floats() -> None:
    """The one-pass score rests on this: the kernel's copies of ATen's sigmoid (vector body: SLEEF's
    expf, scalar tail: libm's) equal ATen's, on every 16th positive float below 110 (above, both
    give 1.0) and on the largest ones; the vector step found is 2 x this build's vector length."""
    from dicom_node.model import postprocess as pp
    from dicom_node.model import window_kernel

    kern = window_kernel.kernel()
    assert kern is not None
    hi = int(np.float32(110).view(np.int32))
    with pp.one_intra_op_thread():
        for start in range(1, hi, 1 << 26):
            bits = torch.arange(start, min(hi, start + (1 << 26)), 16, dtype=torch.int32)
            x = bits.view(torch.float32)
            body = x[:x.numel() // 64 * 64]
            assert torch.equal(kern.sigmoid(body, vector=True), body.sigmoid())
            strided = torch.empty(2 * x.numel())[::2].copy_(x)
            assert torch.equal(kern.sigmoid(x, vector=False), strided.sigmoid())
        big = torch.tensor([1e30, 3e38, float("inf")] * 22)[:64]
        assert torch.equal(kern.sigmoid(big, vector=True), big.sigmoid())
    lanes = {"AVX512": 16, "AVX2": 8}.get(torch.backends.cpu.get_cpu_capability())
    assert lanes is not None  # the CPUs this project runs on
    assert pp.sigmoid_vector_step() == 2 * lanes


def test_the_sigmoid_check_refuses_a_wrong_formula(monkeypatch) -> None:
    """sigmoid_vector_step can fail: the scalar formula offered as the vector body is caught."""
    from dicom_node.model import postprocess as pp
    from dicom_node.model import window_kernel

    real = window_kernel.WindowKernel.sigmoid
    monkeypatch.setattr(window_kernel.WindowKernel, "sigmoid", lambda self, x, vector: real(self, x, vector=False))
    pp.sigmoid_vector_step.cache_clear()
    try:
        assert pp.sigmoid_vector_step() is None
    finally:
        pp.sigmoid_vector_step.cache_clear()


def test_the_kernel_refuses_taps_outside_the_source() -> None:
    """The C code reads where the taps point: the wrapper checks them first (a ValueError the worker
    reports, not a read outside the tensor)."""
    from dicom_node.model import window_kernel
    from dicom_node.model.postprocess import linear_axis

    kern = window_kernel.kernel()
    assert kern is not None
    src = torch.randn(8, 10)
    cols, rows = linear_axis(20, 10), linear_axis(16, 8)
    good_cols, good_rows = (cols.i0, cols.i1, cols.w0, cols.w1), (rows.i0, rows.i1, rows.w0, rows.w1)
    out, positive = torch.empty(320), torch.empty(320, dtype=torch.uint8)
    kern.window_band(src, good_cols, good_rows, (0, 320), torch.empty(40), out, positive)
    bad_col = cols.i1.clone()
    bad_col[-1] = 10
    bad_row = rows.i0.clone()
    bad_row[0] = -1
    for taps in (((cols.i0, bad_col, cols.w0, cols.w1), good_rows), (good_cols, (bad_row, rows.i1, rows.w0, rows.w1))):
        with pytest.raises(ValueError, match="outside"):
            kern.window_band(src, *taps, (0, 320), torch.empty(40), out, positive)
        with pytest.raises(ValueError, match="outside"):
            kern.window_score(src, *taps, torch.tensor([0, 320]), 32, torch.empty(40), torch.empty(20), positive,
                              kern.new_sum())


@pytest.mark.parametrize("failure", ["no compiler", "no temp dir", "build fails"])
def test_a_node_that_cannot_build_the_kernel_logs_it_and_parses_on(bench, monkeypatch, caplog, failure) -> None:
    """No compiler on the PATH, no writable temporary directory, a compiler that fails: the kernel is
    None, one WARNING line says why, and the postprocess runs on the ATen path (same bits)."""
    import tempfile

    from dicom_node.model import postprocess as pp
    from dicom_node.model import window_kernel

    inp = bench.synthetic_inputs("1024x768", seed=13)
    with_kernel = bench.run(postprocess, inp)
    assert with_kernel.upsampler.kernel is not None
    monkeypatch.delenv("CC", raising=False)
    if failure == "no compiler":
        monkeypatch.setenv("PATH", "/nonexistent")
    elif failure == "no temp dir":
        monkeypatch.setattr(tempfile, "tempdir", "/nonexistent/tmp")
    else:
        monkeypatch.setenv("CC", "false")  # coreutils' false: exits 1
    window_kernel.kernel.cache_clear()
    pp.native_is_exact.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="dicom_node.model.window_kernel"):
            assert window_kernel.kernel() is None
        assert any("event=postprocess.kernel status=unavailable" in r.getMessage() for r in caplog.records)
        without = bench.run(postprocess, inp)
        assert without.upsampler.kernel is None
        bench.assert_identical(with_kernel, without)
    finally:
        monkeypatch.undo()
        window_kernel.kernel.cache_clear()
        pp.native_is_exact.cache_clear()
