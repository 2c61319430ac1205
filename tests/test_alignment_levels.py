"""Alignment levels: bucketing, CLIP scores against an independent computation, resume, bad rows, CLI."""

import argparse
import json
import os
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPModel

from transformers_aligngpt.alignment_levels import (
    BadRowsError,
    _PairView,
    _row_digests,
    _shard_ranges,
    add_alignment_levels,
    add_levels_subparser,
    assign_levels,
    main,
    score_pairs,
)
from transformers_aligngpt.data import load_llava_json

# ---------------------------------------------------------------------------------------------------------------
# assign_levels
# ---------------------------------------------------------------------------------------------------------------


def brute_force_levels(scores, num_levels):
    """Rank of row i = rows with a smaller score + earlier rows with an equal score; level = rank * L // n."""
    s = np.asarray(scores, dtype=np.float64)
    n = len(s)
    smaller = (s[None, :] < s[:, None]).sum(1)
    earlier_equal = np.tril(s[None, :] == s[:, None], k=-1).sum(1)
    return (smaller + earlier_equal) * num_levels // n


@pytest.mark.parametrize("seed", range(6))
def test_levels_match_brute_force_and_have_equal_sizes(seed):
    rng = np.random.default_rng(seed)
    for _ in range(20):
        num_levels = int(rng.integers(1, 12))
        n = int(rng.integers(num_levels, 300))
        # few distinct values in half the cases: many ties
        scores = rng.normal(size=n) if rng.random() < 0.5 else rng.integers(0, 5, size=n).astype(float)
        levels = assign_levels(scores, num_levels)
        np.testing.assert_array_equal(levels, brute_force_levels(scores, num_levels))
        sizes = np.bincount(levels, minlength=num_levels)
        assert len(sizes) == num_levels and sizes.min() >= 1
        assert sizes.max() - sizes.min() <= 1
        # order: a strictly higher score never gets a lower level
        order = np.argsort(scores, kind="stable")
        assert np.all(np.diff(levels[order]) >= 0)
        # deterministic
        np.testing.assert_array_equal(levels, assign_levels(scores.copy(), num_levels))


def test_levels_ties_follow_row_order():
    scores = np.array([0.5, 0.1, 0.5, 0.5, 0.9, 0.1, 0.5, 0.5])
    levels = assign_levels(scores, 4)
    # ranks: 0.1 (rows 1, 5) -> 0, 1; 0.5 (rows 0, 2, 3, 6, 7) -> 2..6; 0.9 (row 4) -> 7; level = rank // 2
    np.testing.assert_array_equal(levels, [1, 0, 1, 2, 3, 0, 2, 3])


def test_levels_all_equal_scores_split_by_row_order():
    levels = assign_levels(np.full(10, 0.3), 4)
    np.testing.assert_array_equal(levels, np.arange(10) * 4 // 10)
    assert np.bincount(levels).tolist() == [3, 2, 3, 2]


def test_levels_errors_and_inputs():
    with pytest.raises(ValueError, match="cannot cut 5 scores into 8"):
        assign_levels(np.arange(5.0), 8)
    with pytest.raises(ValueError, match="NaN"):
        assign_levels([0.1, float("nan"), 0.3], 2)
    with pytest.raises(ValueError, match="positive integer"):
        assign_levels([0.1, 0.2], 0)
    # exactly as many rows as levels: one row per level, in score order
    np.testing.assert_array_equal(assign_levels([0.3, 0.1, 0.2], 3), [2, 0, 1])
    # torch tensors and lists
    np.testing.assert_array_equal(assign_levels(torch.tensor([0.3, 0.1, 0.2, 0.0]), 2), [1, 0, 1, 0])
    ds = datasets.Dataset.from_dict({"clip_score": [0.3, 0.1, 0.2, 0.0], "alignment_level": [None] * 4})
    assert list(add_alignment_levels(ds, 2)["alignment_level"]) == [1, 0, 1, 0]


# ---------------------------------------------------------------------------------------------------------------
# score_pairs
# ---------------------------------------------------------------------------------------------------------------


def reference_scores(clip_tiny, paths, captions):
    """Cosine similarity computed pair by pair: image processor, tokenizer, get_*_features, F.cosine_similarity."""
    model, image_processor, tokenizer = clip_tiny
    out = []
    with torch.no_grad():
        for path, caption in zip(paths, captions):
            pixel_values = image_processor(images=Image.open(path), return_tensors="pt")["pixel_values"]
            text = tokenizer(caption, return_tensors="pt")
            image_embeds = model.get_image_features(pixel_values=pixel_values).pooler_output
            text_embeds = model.get_text_features(**text).pooler_output
            out.append(torch.nn.functional.cosine_similarity(image_embeds, text_embeds).item())
    return np.array(out)


def pair_dataset(folder, files, captions, ids=None, relative=False):
    """`relative=True`: the paths as given (to be read with `image_folder=folder`), so that the rows, and the shard
    boundaries that follow them, are the same in every test run."""
    return datasets.Dataset.from_dict(
        {
            "id": ids if ids is not None else [f"r{i}" for i in range(len(files))],
            "images": [[f if relative else str(Path(folder) / f)] for f in files],
            "caption": captions,
        }
    )


def scores_of(dataset):
    return dataset.with_format("arrow")["clip_score"].to_numpy()


def shard_ranges_of(dataset, shard_size, image_column="images", text_column="caption"):
    """The cache shards `score_pairs` cuts the dataset into (their boundaries follow the content)."""
    view = _PairView(dataset, image_column, text_column, None, None)
    return _shard_ranges(_row_digests(view, view.table()), shard_size)


# ---------------------------------------------------------------------------------------------------------------
# content-defined shards
# ---------------------------------------------------------------------------------------------------------------


def test_shards_follow_the_content_so_an_edit_moves_no_other_shard():
    rng = np.random.default_rng(0)
    digests = rng.integers(0, 2**63, size=5000, dtype=np.uint64)
    ranges = _shard_ranges(digests, 64)
    assert ranges[0][0] == 0 and ranges[-1][1] == 5000
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # consecutive, no gap, no overlap
    assert all(0 < end - start <= 4 * 64 for start, end in ranges)
    assert 40 < len(ranges) < 120  # about 5000 / 64 on average
    # every shard but the last ends at a row whose digest is 0 mod shard_size (or at the 4x cap)
    assert all(digests[end - 1] % 64 == 0 or end - start == 256 for start, end in ranges[:-1])

    def shards_as_rows(ranges, rows):
        return {tuple(rows[start:end]) for start, end in ranges}

    rows = list(range(5000))
    before = shards_as_rows(ranges, rows)
    for edit in ("remove", "insert"):
        if edit == "remove":
            kept = [r for r in rows if r != 2500]
            new_digests = digests[kept]
        else:
            kept = rows[:2500] + [-1] + rows[2500:]
            new_digests = np.concatenate([digests[:2500], np.array([12345], dtype=np.uint64), digests[2500:]])
        after = shards_as_rows(_shard_ranges(new_digests, 64), kept)
        changed = after - before
        # only the shard holding the edit is new (two, when the edit removes or adds a boundary)
        assert 1 <= len(changed) <= 2, edit
        assert sum(map(len, changed)) < 2 * 4 * 64


@pytest.fixture
def count_image_calls(monkeypatch):
    """Counts rows that reach CLIPModel.get_image_features; `fail_at=k` raises on the k-th call (a crash)."""
    calls = []
    control = {"fail_at": None}
    original = CLIPModel.get_image_features

    def counting(self, pixel_values, **kwargs):
        calls.append(int(pixel_values.shape[0]))
        if control["fail_at"] is not None and len(calls) == control["fail_at"]:
            raise RuntimeError("simulated crash")
        return original(self, pixel_values=pixel_values, **kwargs)

    monkeypatch.setattr(CLIPModel, "get_image_features", counting)
    return calls, control


def test_scores_equal_independent_cosine(clip_tiny_dir, clip_tiny, clip_pairs, tmp_path):
    folder, files, captions = clip_pairs(37)
    ds = pair_dataset(folder, files, captions)
    out, report = score_pairs(
        ds,
        clip_tiny_dir,
        batch_size=8,
        num_workers=2,
        shard_size=16,
        cache_dir=tmp_path / "cache",
        device="cpu",
        return_report=True,
    )
    assert len(report) == 0
    assert out.column_names == ["id", "images", "caption", "clip_score"]
    assert out["id"] == ds["id"]
    expected = reference_scores(clip_tiny, [folder / f for f in files], captions)
    np.testing.assert_allclose(scores_of(out), expected, rtol=0, atol=1e-5)
    assert np.std(expected) > 1e-3  # the pairs really differ

    # every image layout gives the same scores: path string + image_folder, datasets.Image feature, the full
    # image processor in the workers instead of normalisation on the device
    as_paths = datasets.Dataset.from_dict({"image": files, "caption": captions})
    out_paths = score_pairs(
        as_paths,
        clip_tiny_dir,
        image_column="image",
        id_column=None,
        image_folder=folder,
        batch_size=16,
        num_workers=0,
        cache_dir=tmp_path / "cache2",
        device="cpu",
        progress=False,
    )
    np.testing.assert_allclose(scores_of(out_paths), expected, rtol=0, atol=1e-5)
    as_images = datasets.Dataset.from_dict(
        {"image": [str(folder / f) for f in files], "caption": captions}
    ).cast_column("image", datasets.Image())
    out_images = score_pairs(
        as_images,
        clip_tiny_dir,
        image_column="image",
        batch_size=16,
        num_workers=1,
        cache_dir=tmp_path / "cache3",
        device="cpu",
        normalize_on_device=False,
        progress=False,
    )
    np.testing.assert_allclose(scores_of(out_images), expected, rtol=0, atol=1e-5)


def score_in_batches_of_8(dataset, clip_dir, tmp_path, **kwargs):
    """score_pairs on the CPU in this process, batches of 8, a fresh cache."""
    return score_pairs(dataset, clip_dir, batch_size=8, num_workers=0, cache_dir=tmp_path / "cache", device="cpu",
                       progress=False, **kwargs)


def test_compiled_tower_pads_short_batches_instead_of_recompiling(
    clip_tiny_dir, clip_tiny, clip_pairs, tmp_path, monkeypatch
):
    # 37 pairs in batches of 8: the last batch holds 5. Compiled, the tower must see one shape only (a recompile
    # costs about a minute on a GPU), and the padding must not change a score. Dynamo runs for real, with its
    # "eager" backend (inductor's code generation is slow on a CPU and has no say in shapes).
    folder, files, captions = clip_pairs(37)
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, backend="eager"))
    torch._dynamo.reset()
    try:
        # (torch's own patch: pytest's monkeypatch deletes a dynamo config entry on undo instead of restoring it)
        with torch._dynamo.config.patch(error_on_recompile=True):
            out = score_in_batches_of_8(pair_dataset(folder, files, captions), clip_tiny_dir, tmp_path, compile=True)
    finally:
        torch._dynamo.reset()
    expected = reference_scores(clip_tiny, [folder / f for f in files], captions)
    np.testing.assert_allclose(scores_of(out), expected, rtol=0, atol=1e-5)


def test_next_batch_is_queued_before_the_scores_are_read(clip_tiny_dir, clip_pairs, tmp_path, monkeypatch):
    # one batch in flight: the device gets batch k+1 before the host waits for batch k's scores
    from transformers_aligngpt.alignment_levels import _ClipScorer

    folder, files, captions = clip_pairs(20)
    order = []
    launch, finish = _ClipScorer.launch, _ClipScorer.finish

    def recording_launch(self, batch):
        order.append(("launch", int(batch["indices"][0])))
        return launch(self, batch)

    def recording_finish(self, batch, launched):
        order.append(("finish", int(batch["indices"][0])))
        return finish(self, batch, launched)

    monkeypatch.setattr(_ClipScorer, "launch", recording_launch)
    monkeypatch.setattr(_ClipScorer, "finish", recording_finish)
    score_in_batches_of_8(pair_dataset(folder, files, captions), clip_tiny_dir, tmp_path)
    assert order == [
        ("launch", 0), ("launch", 8), ("finish", 0), ("launch", 16), ("finish", 8), ("finish", 16)
    ]


def test_image_backend_choice_and_separate_caches(clip_tiny_dir, clip_pairs, tmp_path):
    import importlib.util

    from transformers import CLIPImageProcessorPil

    from transformers_aligngpt.alignment_levels import _load_image_processor

    has_torchvision = importlib.util.find_spec("torchvision") is not None
    assert isinstance(_load_image_processor(clip_tiny_dir, "pil"), CLIPImageProcessorPil)
    assert isinstance(_load_image_processor(clip_tiny_dir, "auto"), CLIPImageProcessorPil) is not has_torchvision
    folder, files, captions = clip_pairs(9)
    ds = pair_dataset(folder, files, captions)
    with pytest.raises(ValueError, match="image_backend must be one of"):
        score_pairs(ds, clip_tiny_dir, image_backend="opencv", device="cpu", cache_dir=tmp_path / "c", progress=False)
    common = dict(batch_size=4, num_workers=0, cache_dir=tmp_path / "cache", device="cpu", progress=False)
    pil = scores_of(score_pairs(ds, clip_tiny_dir, image_backend="pil", **common))
    if not has_torchvision:
        # asked for explicitly, a missing torchvision is an error (transformers would only warn and use PIL)
        with pytest.raises(ValueError, match="needs torchvision"):
            score_pairs(ds, clip_tiny_dir, image_backend="torchvision", **common)
        return
    # the torchvision backend resizes slightly differently: its own cache entry, scores close to PIL's
    fast = scores_of(score_pairs(ds, clip_tiny_dir, image_backend="torchvision", **common))
    assert len(list((tmp_path / "cache").glob("*.arrow"))) == 2
    np.testing.assert_allclose(fast, pil, rtol=0, atol=2e-2)


def test_worker_chunks_join_into_the_batch_the_tokenizer_would_make(clip_tokenizer):
    # a batch decoded in chunks must reach the model exactly as if it had been prepared whole
    from transformers_aligngpt.alignment_levels import _merge_chunks

    captions = ["a red box", "a tall blue box on a small green table", "two boxes", "one"]
    whole = clip_tokenizer(captions, padding="longest", return_tensors="pt")
    pixels = torch.arange(4 * 3 * 2 * 2, dtype=torch.uint8).reshape(4, 3, 2, 2)

    def chunk(rows, ok=True):
        return {
            "indices": np.array(rows), "ok": np.array([ok] * len(rows)), "errors": [None] * len(rows),
            "pixel_values": pixels[rows] if ok else None,
            "text": dict(clip_tokenizer([captions[r] for r in rows], padding="longest", return_tensors="pt")),
        }

    merged = _merge_chunks([chunk([0]), chunk([1, 2]), chunk([3])], clip_tokenizer.pad_token_id)
    assert merged["indices"].tolist() == [0, 1, 2, 3] and merged["ok"].all()
    assert torch.equal(torch.cat(merged["pixel_values"]), pixels)
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(merged["text"][key], whole[key]), key
    # a chunk whose rows all failed adds its rows and errors, no pixels or text
    failed = {**chunk([1], ok=False), "errors": ["undecodable image"], "text": {}}
    merged = _merge_chunks([chunk([0]), failed], clip_tokenizer.pad_token_id)
    assert merged["ok"].tolist() == [True, False] and merged["errors"] == [None, "undecodable image"]
    assert len(merged["pixel_values"]) == 1 and merged["text"]["input_ids"].shape[0] == 1


def test_images_are_decoded_in_worker_processes(clip_tiny_dir, clip_pairs, tmp_path, monkeypatch):
    folder, files, captions = clip_pairs(12)
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    original = Image.open

    def recording_open(*args, **kwargs):
        (pid_dir / str(os.getpid())).touch()
        return original(*args, **kwargs)

    monkeypatch.setattr(Image, "open", recording_open)
    score_pairs(
        pair_dataset(folder, files, captions),
        clip_tiny_dir,
        batch_size=4,
        num_workers=2,
        device="cpu",
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    pids = {int(p.name) for p in pid_dir.iterdir()}
    assert pids and os.getpid() not in pids


def test_resume_scores_only_what_was_missing(clip_tiny_dir, clip_tiny, clip_pairs, tmp_path, count_image_calls):
    calls, control = count_image_calls
    folder, files, captions = clip_pairs(48)
    ds = pair_dataset(folder, files, captions, relative=True)
    cache = tmp_path / "cache"
    kwargs = dict(batch_size=8, shard_size=16, num_workers=1, cache_dir=cache, device="cpu", progress=False,
                  image_folder=folder)

    ranges = shard_ranges_of(ds, 16)
    assert len(ranges) >= 3
    # the forward passes run over full batches of 8 rows whatever the shards; crash in the one that holds the last
    # row of shard 1: the batches before it are handed over, so the shards they cover are done, shard 1 is not
    control["fail_at"] = (ranges[1][1] - 1) // 8 + 1
    handed_over = 8 * (control["fail_at"] - 1)
    done = [r for r in ranges if r[1] <= handed_over]
    with pytest.raises(RuntimeError, match="simulated crash"):
        score_pairs(ds, clip_tiny_dir, **kwargs)
    assert calls == [8] * control["fail_at"]
    assert len(list(cache.glob("*.arrow"))) == len(done) and ranges[1] not in done
    assert not [p for p in cache.iterdir() if p.suffix != ".arrow"]  # no half-written file left behind

    # the rerun scores the other shards only, in full batches
    control["fail_at"] = None
    calls.clear()
    out = score_pairs(ds, clip_tiny_dir, **kwargs)
    missing = 48 - sum(end - start for start, end in done)
    assert sum(calls) == missing and calls[:-1] == [8] * (len(calls) - 1)
    expected = reference_scores(clip_tiny, [folder / f for f in files], captions)
    np.testing.assert_allclose(scores_of(out), expected, rtol=0, atol=1e-5)

    # a third run scores nothing, also with extra columns
    calls.clear()
    again = score_pairs(ds.add_column("other", list(range(48))), clip_tiny_dir, **kwargs)
    assert calls == []
    np.testing.assert_array_equal(scores_of(again), scores_of(out))
    # appending rows, or removing one in the middle, rescores only the shards whose rows changed
    def rescored_rows(edited):
        old = {tuple(rows) for rows in (ids[start:end] for start, end in ranges)}
        edited_ids = edited["id"]
        return sum(end - start for start, end in shard_ranges_of(edited, 16)
                   if tuple(edited_ids[start:end]) not in old)

    ids = ds["id"]
    extra_files, extra_captions = [files[0]] * 5, [f"new caption {i}" for i in range(5)]
    grown = pair_dataset(folder, files + extra_files, captions + extra_captions, relative=True)
    calls.clear()
    score_pairs(grown, clip_tiny_dir, **kwargs)
    assert sum(calls) == rescored_rows(grown) < 48
    middle = ranges[len(ranges) // 2]
    shrunk = ds.select([i for i in range(48) if i != middle[0] + 1])
    calls.clear()
    np.testing.assert_allclose(scores_of(score_pairs(shrunk, clip_tiny_dir, **kwargs)),
                               np.delete(scores_of(out), middle[0] + 1), rtol=0, atol=1e-5)
    assert sum(calls) == rescored_rows(shrunk) < 47  # the shards before the removed row are not rescored


def test_repeated_rows_share_their_cache_shard(clip_tiny_dir, clip_tiny, clip_pairs, tmp_path, count_image_calls):
    """A corpus that repeats a block of rows gives shards with the same rows, hence the same cache file: each is
    scored once, also for a dataset on disk (whose `map` would otherwise load the file its twin just wrote)."""
    calls, _ = count_image_calls
    folder, files, captions = clip_pairs(24)
    order = list(range(12)) + list(range(12, 24)) + list(range(12)) + list(range(23, 11, -1))
    ds = datasets.Dataset.from_dict({"images": [[files[i]] for i in order], "caption": [captions[i] for i in order]})
    ds.save_to_disk(tmp_path / "saved")
    ds = datasets.load_from_disk(str(tmp_path / "saved"))
    ranges = shard_ranges_of(ds, 4)
    rows = [tuple(order[start:end]) for start, end in ranges]
    assert len(set(rows)) < len(rows)  # some shards repeat
    out = score_pairs(ds, clip_tiny_dir, id_column=None, image_folder=folder, batch_size=4, shard_size=4,
                      num_workers=0, cache_dir=tmp_path / "c", device="cpu", progress=False)
    assert sum(calls) == sum(len(r) for r in set(rows))  # every distinct shard once
    expected = reference_scores(clip_tiny, [folder / files[i] for i in order], [captions[i] for i in order])
    np.testing.assert_allclose(scores_of(out), expected, rtol=0, atol=1e-5)


def write_bad_data(folder, files, captions):
    """Corrupt a copy of the pairs: 1 missing file, 1 undecodable file, 1 empty caption, 1 duplicate id, 1 row
    without image. Returns the dataset, the bad ids with their reason kinds, and the good rows."""
    (Path(folder) / "imgs" / "broken.jpg").write_bytes(b"this is not a JPEG at all" * 10)
    n = len(files)
    ids = [f"r{i}" for i in range(n)]
    images = [[str(Path(folder) / f)] for f in files]
    caps = list(captions)
    images[2] = [str(Path(folder) / "imgs" / "missing.jpg")]
    images[5] = [str(Path(folder) / "imgs" / "broken.jpg")]
    caps[7] = "   "
    ids[9] = ids[3]
    images[11] = []
    ds = datasets.Dataset.from_dict({"id": ids, "images": images, "caption": caps})
    bad = {2: "image file not found", 5: "undecodable image", 7: "empty caption", 9: "duplicate id", 11: "no image"}
    good = [i for i in range(n) if i not in bad]
    return ds, bad, good


def test_bad_rows_skipped_and_reported(clip_tiny_dir, clip_tiny, clip_pairs, tmp_path, count_image_calls):
    calls, _ = count_image_calls
    folder, files, captions = clip_pairs(20)
    ds, bad, good = write_bad_data(folder, files, captions)
    out, report = score_pairs(
        ds,
        clip_tiny_dir,
        batch_size=4,
        shard_size=8,
        num_workers=1,
        cache_dir=tmp_path / "c",
        device="cpu",
        on_bad="skip",
        return_report=True,
        progress=False,
    )
    assert sum(calls) == len(good)  # bad rows never reach the model
    assert report.rows == sorted(bad)
    assert report.ids == [ds["id"][i] for i in sorted(bad)]
    assert [r.split(":")[0] for r in report.reasons] == [bad[i] for i in sorted(bad)]
    assert report.counts() == {kind: 1 for kind in bad.values()}
    assert "5 bad rows" in report.summary() and "r3" in report.summary()
    # the run went through: every good row is there, scored like the independent computation
    assert out["id"] == [ds["id"][i] for i in good]
    expected = reference_scores(clip_tiny, [folder / files[i] for i in good], [captions[i] for i in good])
    np.testing.assert_allclose(scores_of(out), expected, rtol=0, atol=1e-5)
    report.save(tmp_path / "bad.json")
    assert json.loads((tmp_path / "bad.json").read_text())["count"] == 5


def test_bad_rows_error_before_scoring(clip_tiny_dir, clip_pairs, tmp_path, count_image_calls):
    calls, _ = count_image_calls
    folder, files, captions = clip_pairs(20)
    ds, bad, _ = write_bad_data(folder, files, captions)
    with pytest.raises(BadRowsError) as info:
        score_pairs(ds, clip_tiny_dir, num_workers=0, cache_dir=tmp_path / "c", device="cpu", on_bad="error")
    # everything visible without decoding is reported before any work: all but the undecodable file
    assert info.value.report.rows == sorted(set(bad) - {5})
    assert "before scoring" in str(info.value)
    assert calls == []


def test_inputs_that_cannot_be_scored_are_named_before_any_work(clip_tiny_dir, clip_pairs, tmp_path):
    from transformers import Siglip2Config, Siglip2Model

    folder, files, captions = clip_pairs(4)
    images = [[str(folder / f)] for f in files]
    # several captions per image (COCO-style) would fail deep in pyarrow
    several = datasets.Dataset.from_dict({"images": images, "caption": [[c, c + " again"] for c in captions]})
    with pytest.raises(ValueError, match=r"column 'caption' must hold one caption string per row"):
        score_pairs(several, clip_tiny_dir, num_workers=0, cache_dir=tmp_path / "c", device="cpu")
    # (Arrow's other string layouts are strings too)
    plain = datasets.Dataset.from_dict({"images": images, "caption": captions})
    view = plain.cast_column("caption", datasets.Value("string_view"))
    scored = [score_pairs(ds, clip_tiny_dir, num_workers=0, cache_dir=tmp_path / name, device="cpu")["clip_score"]
              for name, ds in (("plain", plain), ("view", view))]
    assert scored[0] == scored[1]
    # SigLIP 2's NaFlex processor gives patch sequences, not images
    siglip2 = tmp_path / "siglip2"
    config = Siglip2Config(text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, max_position_embeddings=16),
                           vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=2, num_patches=16, patch_size=8))
    Siglip2Model(config).save_pretrained(siglip2)
    for name in ("tokenizer_config.json", "tokenizer.json", "preprocessor_config.json"):
        if (clip_tiny_dir / name).exists():
            (siglip2 / name).write_bytes((clip_tiny_dir / name).read_bytes())
    pairs = datasets.Dataset.from_dict({"images": images, "caption": captions})
    with pytest.raises(ValueError, match="SigLIP 2 .* not supported for scoring"):
        score_pairs(pairs, siglip2, num_workers=0, cache_dir=tmp_path / "c2", device="cpu")


def test_undecodable_image_error_after_scoring_then_fixed(
    clip_tiny_dir, clip_tiny, clip_pairs, tmp_path, count_image_calls
):
    calls, _ = count_image_calls
    folder, files, captions = clip_pairs(20)
    broken = folder / files[13]
    good_bytes = broken.read_bytes()
    broken.write_bytes(good_bytes[: len(good_bytes) // 3])  # truncated JPEG
    ds = pair_dataset(folder, files, captions)
    kwargs = dict(batch_size=4, shard_size=8, num_workers=1, cache_dir=tmp_path / "c", device="cpu", progress=False)
    with pytest.raises(BadRowsError) as info:
        score_pairs(ds, clip_tiny_dir, on_bad="error", **kwargs)
    assert info.value.report.rows == [13] and info.value.report.ids == ["r13"]
    assert info.value.report.reasons[0].startswith("undecodable image")
    assert sum(calls) == 19  # all other pairs were scored ...
    assert len(list((tmp_path / "c").glob("*.arrow"))) == len(shard_ranges_of(ds, 8))  # ... and cached

    broken.write_bytes(good_bytes)  # the user fixes the file: the rerun scores that image only
    calls.clear()
    out = score_pairs(ds, clip_tiny_dir, on_bad="error", **kwargs)
    assert calls == [1]
    expected = reference_scores(clip_tiny, [folder / f for f in files], captions)
    np.testing.assert_allclose(scores_of(out), expected, rtol=0, atol=1e-5)


def test_siglip_checkpoint(tmp_path, clip_pairs, clip_tokenizer):
    from transformers import AutoImageProcessor, AutoTokenizer, SiglipConfig, SiglipImageProcessorPil, SiglipModel

    tokenizer = clip_tokenizer
    config = SiglipConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
    )
    torch.manual_seed(1)
    model = SiglipModel(config).eval()
    processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    for part in (model, tokenizer, processor):
        part.save_pretrained(tmp_path / "siglip")
    folder, files, captions = clip_pairs(10)
    out = score_pairs(
        pair_dataset(folder, files, captions),
        tmp_path / "siglip",
        num_workers=0,
        device="cpu",
        cache_dir=tmp_path / "c",
        progress=False,
    )
    loaded = AutoTokenizer.from_pretrained(tmp_path / "siglip")
    processor = AutoImageProcessor.from_pretrained(tmp_path / "siglip")  # the backend score_pairs picks
    expected = []
    with torch.no_grad():
        for f, caption in zip(files, captions):
            pixel_values = processor(images=Image.open(folder / f), return_tensors="pt")["pixel_values"]
            text = loaded(caption, padding="max_length", max_length=16, return_tensors="pt")
            a = model.get_image_features(pixel_values=pixel_values).pooler_output
            b = model.get_text_features(**text).pooler_output
            expected.append(torch.nn.functional.cosine_similarity(a, b).item())
    np.testing.assert_allclose(scores_of(out), expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------


def write_llava_file(path, files, captions, extra=(), changes=()):
    """A LLaVA pre-training file for the pairs (plus `extra` records); `changes[i]` updates record i."""
    records = [
        {
            "id": f"{i:06d}",
            "image": f,
            "conversations": [
                {"from": "human", "value": "Give a brief description of the image.\n<image>"},
                {"from": "gpt", "value": c},
            ],
        }
        for i, (f, c) in enumerate(zip(files, captions))
    ]
    for record, change in zip(records, changes):
        record.update(change)
    records.extend(extra)
    Path(path).write_text(json.dumps(records))
    return records


def test_cli_levels_end_to_end(clip_tiny_dir, clip_tiny, clip_pairs, tmp_path, capsys):
    folder, files, captions = clip_pairs(24)
    missing = {
        "id": "gone",
        "image": "imgs/nope.jpg",
        "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}],
    }
    # what LLaVA-layout files in the wild hold, which the output must keep as it is: a numeric id, an extra field,
    # a one-element image list, a placeholder without its newline
    unusual = [
        {"id": 424242},
        {"source": "laion", "extra": {"nested": [1, 2]}},
        {"image": [files[2]]},
        {"conversations": [{"from": "human", "value": "<image>Describe."}, {"from": "gpt", "value": captions[3]}]},
    ]
    records = write_llava_file(tmp_path / "pretrain.json", files, captions, extra=[missing], changes=unusual)
    out_file = tmp_path / "levels.json"
    status = main(
        [
            "--data",
            str(tmp_path / "pretrain.json"),
            "--image-folder",
            str(folder),
            "--clip",
            str(clip_tiny_dir),
            "--num-levels",
            "4",
            "--output",
            str(out_file),
            "--batch-size",
            "8",
            "--num-workers",
            "1",
            "--device",
            "cpu",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--bad-rows-report",
            str(tmp_path / "bad.json"),
            "--include-clip-score",
            "--no-progress",
        ]
    )
    assert status == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["records"] == 24 and summary["skipped"] == 1 and summary["skipped_ids"] == ["gone"]
    assert summary["level_sizes"] == [6, 6, 6, 6]

    written = json.loads(out_file.read_text())
    expected_scores = reference_scores(clip_tiny, [folder / f for f in files], captions)
    expected_levels = brute_force_levels(expected_scores, 4)
    assert [r["similarity"] for r in written] == expected_levels.tolist()
    # the original's records come back unchanged apart from the new fields (the skipped one left out)
    assert len(written) == 24
    for original, new in zip(records, written):
        assert {k: v for k, v in new.items() if k not in ("similarity", "clip_score")} == original
    np.testing.assert_allclose([r["clip_score"] for r in written], expected_scores, atol=1e-5)
    # the written file reads back with its levels
    assert load_llava_json(out_file, folder)["alignment_level"] == expected_levels.tolist()
    assert json.loads((tmp_path / "bad.json").read_text())["rows"][0]["id"] == "gone"

    # --on-bad error: exit status 1, nothing written
    status = main(
        [
            "--data",
            str(tmp_path / "pretrain.json"),
            "--image-folder",
            str(folder),
            "--clip",
            str(clip_tiny_dir),
            "--output",
            str(tmp_path / "never.json"),
            "--device",
            "cpu",
            "--num-workers",
            "0",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--on-bad",
            "error",
            "--no-progress",
        ]
    )
    assert status == 1 and not (tmp_path / "never.json").exists()
    err = capsys.readouterr().err
    assert "gone" in err and "--on-bad skip" in err


def test_cli_levels_too_few_rows_stop_with_the_report(clip_tiny_dir, clip_pairs, tmp_path, capsys, count_image_calls):
    calls, _ = count_image_calls
    folder, files, captions = clip_pairs(6)
    write_llava_file(tmp_path / "small.json", files, captions)
    common = ["--data", str(tmp_path / "small.json"), "--image-folder", str(folder), "--clip", str(clip_tiny_dir),
              "--output", str(tmp_path / "out.json"), "--device", "cpu", "--num-workers", "0",
              "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    # impossible level counts stop before anything is scored
    with pytest.raises(SystemExit) as exit_info:
        main(common + ["--num-levels", "1"])
    assert exit_info.value.code == 2 and "expected at least 2 alignment levels" in capsys.readouterr().err
    assert main(common + ["--num-levels", "7"]) == 1
    assert "holds 6 records, fewer than --num-levels 7" in capsys.readouterr().err
    assert calls == []
    # enough records, but too few left once the bad ones are skipped: a clear error, and the bad rows are saved
    (folder / files[0]).unlink()
    (folder / files[1]).write_bytes(b"not an image")
    report = tmp_path / "bad.json"
    assert main(common + ["--num-levels", "5", "--bad-rows-report", str(report)]) == 1
    err = capsys.readouterr().err
    assert "4 pairs are left after skipping 2 bad rows, fewer than --num-levels 5" in err
    assert sorted(r["id"] for r in json.loads(report.read_text())["rows"]) == ["000000", "000001"]
    assert not (tmp_path / "out.json").exists()


def test_levels_subparser_registers_on_a_cli():
    parser = argparse.ArgumentParser(prog="aligngpt")
    add_levels_subparser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["levels", "--data", "d.json", "--output", "o.json", "--num-levels", "5"])
    assert args.command == "levels" and args.num_levels == 5 and args.clip == "openai/clip-vit-large-patch14-336"
    assert args.func.__name__ == "run_levels" and args.on_bad == "skip"


@pytest.mark.slow
def test_two_processes_split_the_shards(clip_tiny_dir, clip_tiny, clip_pairs, tmp_path):
    """Under torchrun each process scores its share of the shards; every process sees all results."""
    import subprocess
    import sys

    folder, files, captions = clip_pairs(20)
    write_llava_file(tmp_path / "data.json", files, captions)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "transformers_aligngpt.alignment_levels",
        "--data",
        str(tmp_path / "data.json"),
        "--image-folder",
        str(folder),
        "--clip",
        str(clip_tiny_dir),
        "--output",
        str(tmp_path / "out.json"),
        "--num-workers",
        "0",
        "--shard-size",
        "4",
        "--batch-size",
        "4",
        "--num-levels",
        "4",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--include-clip-score",
        "--no-progress",
    ]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranges = shard_ranges_of(load_llava_json(tmp_path / "data.json", folder), 4)
    first_half = ranges[: (len(ranges) + 1) // 2]  # accelerate gives process 0 the first half (+1 when odd)
    here = sum(end - start for start, end in first_half)
    assert f"{len(ranges)} to score on 2 process(es); {here} rows here" in done.stderr
    assert done.stdout.count('"records": 20') == 1  # written once, by the main process
    written = json.loads((tmp_path / "out.json").read_text())
    expected = reference_scores(clip_tiny, [folder / f for f in files], captions)
    np.testing.assert_allclose([r["clip_score"] for r in written], expected, atol=1e-5)
    assert [r["similarity"] for r in written] == brute_force_levels(expected, 4).tolist()
