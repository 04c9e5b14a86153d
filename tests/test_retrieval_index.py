"""`eval retrieval --index GALLERY`: a deployed gallery's retrieval, with its own model, latents and search
settings, by its index and exactly; query objects it does not hold left out and named; refusals before the model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import cli, cli_ok


@pytest.fixture(scope="module")
def flat_gallery(mile_run, tmp_path_factory) -> Path:
    """A flat gallery of the MILE run's 6 objects, built from the photo-folder form's gallery photos."""
    out = tmp_path_factory.mktemp("retrieval-index") / "g"
    code, _, err = cli("index", "build", str(mile_run / "gallery"), "--run", str(mile_run / "run"), "--out", str(out))
    assert code == 0, err
    return out


def scores(row: dict) -> list:
    return [row[f"R@{k}"] for k in range(1, 11)]


def blended_queries(mile_run: Path, dest: Path) -> Path:
    """Query photos hard enough that the tiny run ranks some objects below others: each object's 2 photos blend its
    gallery photo with the next object's (new bytes, none a gallery photo)."""
    from PIL import Image

    rng = np.random.default_rng(1)
    for i in range(6):
        own = np.asarray(Image.open(mile_run / "gallery" / f"obj{i}" / "0.png"), dtype=np.float64)
        other = np.asarray(Image.open(mile_run / "gallery" / f"obj{(i + 1) % 6}" / "1.png"), dtype=np.float64)
        (dest / f"obj{i}").mkdir(parents=True)
        for k, weight in enumerate((0.45, 0.55)):
            pixels = weight * own + (1 - weight) * other + rng.normal(0, 10, own.shape)
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(dest / f"obj{i}" / f"m{k}.png")
    return dest


def test_index_scores_equal_the_photo_folder_scores_of_the_same_model_and_photos(mile_run, flat_gallery, tmp_path,
                                                                                capsys):
    """A flat gallery built from the gallery photos, searched with the query photos the photo-folder form draws
    (the same objects, sample and noise), ranks every query as that form's `mile` rows do: R@k identical, by the
    index and exactly."""
    folders, indexed = tmp_path / "folders.json", tmp_path / "index.json"
    query = blended_queries(mile_run, tmp_path / "query")
    common = ("--query", str(query), "--query-size", "all", "--noise", "0", "0.5", "--seed", "3")
    cli_ok(capsys, "eval", "retrieval", "--gallery", str(mile_run / "gallery"), "--run", str(mile_run / "run"),
           *common, "--out", str(folders))
    out, err = cli_ok(capsys, "eval", "retrieval", "--index", str(flat_gallery), *common, "--out", str(indexed))
    assert "model:" in err and "search" in out and "exact (every stored latent)" in out
    assert "the gallery's index is flat: it searches exactly, so its rows equal the exact ones" in out
    expected = {r["noise"]: scores(r) for r in json.loads(folders.read_text())["results"]
                if r["method"] == "mile" and r["backbone"] == "trained"}
    payload = json.loads(indexed.read_text())
    assert payload["command"] == "eval retrieval" and payload["index"] == str(flat_gallery)
    assert payload["objects"] == payload["queries"] == 6 and payload["left_out"] == {"removed": [], "absent": []}
    assert payload["query_photos_compared_with_gallery"] is True
    assert {(r["search"], r["noise"]) for r in payload["results"]} == {(s, n) for s in ("index", "exact")
                                                                      for n in (0.0, 0.5)}
    for row in payload["results"]:
        assert row["method"] == "mile" and scores(row) == expected[row["noise"]], row
        assert row["R@1"] < 1 and row["photos_replaced"] == (6 if row["noise"] else 0)  # not trivially all found
    # mlsctl compare's columns: the gallery's search, and the exact search apart
    from mlsctl.evaluate.results import headline

    assert set(headline(payload)) == {f"{score} mile{exact}{noise}" for score in ("AR@10", "R@1")
                                      for exact in ("", " exact") for noise in ("", ", noise 50%")}
    # --json prints what it writes
    out, _ = cli_ok(capsys, "eval", "retrieval", "--index", str(flat_gallery), *common, "--out",
                    str(tmp_path / "again.json"), "--json")
    assert json.loads(out)["results"] == payload["results"]


def test_objects_removed_from_the_gallery_or_never_in_it_are_left_out_and_named(mile_run, flat_gallery, tmp_path,
                                                                                capsys):
    gallery = tmp_path / "g"
    shutil.copytree(flat_gallery, gallery)
    cli_ok(capsys, "index", "remove", str(gallery), "obj2")
    query = tmp_path / "query"
    shutil.copytree(mile_run / "query", query)
    shutil.copytree(mile_run / "query" / "obj1", query / "stranger")  # an object the gallery never held
    out, _ = cli_ok(capsys, "eval", "retrieval", "--index", str(gallery), "--query", str(query), "--noise", "0",
                    "--out", str(tmp_path / "r.json"))
    assert ("note: 2 of the 7 query objects are left out of R@k, 1 removed from the gallery: obj2; 1 never in it: "
            "stranger") in out
    payload = json.loads((tmp_path / "r.json").read_text())
    assert payload["objects"] == 5 and payload["queries"] == 5
    assert payload["left_out"] == {"removed": ["obj2"], "absent": ["stranger"]}
    assert all(r["queries"] == 5 and r["gallery"] == 5 for r in payload["results"])
    # a query set none of whose objects the gallery holds: one sentence, before the model loads
    only = tmp_path / "only"
    shutil.copytree(query / "obj2", only / "obj2")
    shutil.copytree(query / "stranger", only / "stranger")
    code, _, err = cli("eval", "retrieval", "--index", str(gallery), "--query", str(only), capsys=capsys)
    assert code == 2 and "none of the 2 query objects of" in err and "1 of the query objects was removed from it: obj2" in err
    assert "model:" not in err and err.count("\n") == 1, err


def test_query_ids_that_read_like_removed_ids_are_left_out_as_removed_and_named(mile_run, tmp_path, capsys):
    """A probe (2026-12-08): query folders 'café' (NFC) and 'xz' of objects removed from the gallery as 'cafe' + U+0301
    and 'x' U+200B 'z' were "never in it" (JSON left_out.absent), and where every query object was removed the refusal
    named none and said "(8 objects, 2 of them removed from it)", read as 2 of the gallery's 8. A query id that reads
    like a removed id is removed, named with the removed id; the refusal names the removed query objects."""
    from mlsctl.gallery import printable

    source = tmp_path / "source"
    shutil.copytree(mile_run / "gallery", source)
    (source / "obj0").rename(source / "cafe\u0301")
    (source / "obj1").rename(source / "x\u200bz")
    gallery = tmp_path / "g"
    cli_ok(capsys, "index", "build", str(source), "--run", str(mile_run / "run"), "--out", str(gallery))
    cli_ok(capsys, "index", "remove", str(gallery), "cafe\u0301", "x\u200bz")
    query = tmp_path / "query"
    shutil.copytree(mile_run / "query", query)
    (query / "obj0").rename(query / "caf\u00e9")
    (query / "obj1").rename(query / "xz")
    out, _ = cli_ok(capsys, "eval", "retrieval", "--index", str(gallery), "--query", str(query), "--noise", "0",
                    "--out", str(tmp_path / "r.json"))
    note = next(line for line in out.splitlines() if "left out of R@k" in line)
    assert "2 removed from the gallery: " in note and "never in it" not in note, note
    for given, removed in (("caf\u00e9", "cafe\u0301"), ("xz", "x\u200bz")):
        assert f"{given} (reads like removed '{printable(removed)}')" in note, note
    left_out = json.loads((tmp_path / "r.json").read_text())["left_out"]
    assert sorted(left_out["removed"]) == ["caf\u00e9", "xz"] and left_out["absent"] == []
    only = tmp_path / "only"
    for name in ("caf\u00e9", "xz", "obj1"):
        shutil.copytree(query / name if name != "obj1" else mile_run / "query" / "obj1", only / (name if name != "obj1"
                        else "stranger"))
    code, _, err = cli("eval", "retrieval", "--index", str(gallery), "--query", str(only), capsys=capsys)
    assert code == 2 and "model:" not in err, err
    cafe, xz = "cafe\u0301", "x\u200bz"
    assert (f"none of the 3 query objects of {only} is in gallery {gallery}, which holds 4 objects; 2 of the query "
            f"objects were removed from it: ") in err and f"(reads like removed '{printable(cafe)}')" in err
    assert f"xz (reads like removed '{printable(xz)}')" in err, err


def test_query_folder_messages_name_the_query_option_and_its_query_sub_folder(mile_run, flat_gallery, tmp_path,
                                                                                capsys, caplog):
    """A probe (2026-12-08): an empty --query folder was "gallery images qs/empty contains no images", and --query
    given a data set's root (gallery/ and query/ under it) was told to "give ROOT/gallery instead". Messages name
    --query, and the note suggests the query sub-folder."""
    (tmp_path / "empty").mkdir()
    err = refused_before_the_model("--index", str(flat_gallery), "--query", str(tmp_path / "empty"), capsys=capsys)
    assert f"error: --query {tmp_path / 'empty'} contains no images" in err and "gallery images" not in err, err
    root = tmp_path / "root"
    shutil.copytree(mile_run / "gallery", root / "gallery")
    shutil.copytree(mile_run / "query", root / "query")
    with caplog.at_level("WARNING", logger="mlsctl"):
        code, _, err = cli("eval", "retrieval", "--index", str(flat_gallery), "--query", str(root), capsys=capsys)
    said = caplog.text + err
    assert code == 2 and f"give {root / 'query'} instead" in said and f"give {root / 'gallery'}" not in said, said


def test_refusals_come_before_the_model_loads(mile_run, flat_gallery, tmp_path, capsys):
    def refused(*args: str) -> str:
        code, out, err = cli("eval", "retrieval", *args, capsys=capsys)
        assert code == 2 and "model:" not in err and "Traceback" not in err and not out, (code, out, err)
        return err

    query = str(mile_run / "query")
    err = refused("--index", str(tmp_path / "nowhere"), "--query", query)
    assert f"gallery {tmp_path / 'nowhere'} does not exist" in err
    err = refused("--index", str(mile_run / "gallery"), "--query", query)  # photos given as the gallery index
    assert "is not a gallery (no gallery.json): --index takes a gallery made by mlsctl index build" in err
    assert "goes to --gallery" in err
    err = refused("--index", str(flat_gallery), "--query", str(tmp_path / "no-query"))
    assert f"--query {tmp_path / 'no-query'} does not exist" in err
    err = refused("--index", str(flat_gallery), "--gallery", str(mile_run / "gallery"), "--query", query)
    assert "--gallery names gallery photos to embed, --index a gallery" in err
    # the gallery's own photos as queries would find their objects trivially
    err = refused("--index", str(flat_gallery), "--query", str(mile_run / "gallery"))
    assert "is a photo gallery" in err and "holds already (the same bytes" in err
    # a damaged gallery: a stored latent NaN (the exact search reads the latents)
    damaged = tmp_path / "damaged"
    shutil.copytree(flat_gallery, damaged)
    manifest = json.loads((damaged / "gallery.json").read_text())
    latents = damaged / manifest["data"] / "latents.bin"
    values = np.fromfile(latents, dtype=np.float32)
    values[0] = np.nan
    values.tofile(latents)
    err = refused("--index", str(damaged), "--query", query)
    assert f"gallery {damaged} is damaged: the stored latents of 1 object" in err
    # a run whose model cannot be the gallery's: another input size in its config.yaml
    other = tmp_path / "other-run"
    shutil.copytree(mile_run / "run", other)
    config = (other / "config.yaml").read_text()
    size = manifest["model"]["resolution"]
    assert f"size: {size}\n" in config
    (other / "config.yaml").write_text(config.replace(f"size: {size}\n", f"size: {size * 2}\n", 1))
    err = refused("--index", str(flat_gallery), "--query", query, "--run", str(other))
    assert f"--run {other} is not the model gallery {flat_gallery} was built with" in err
    assert f"resolution {size} (the run's: {size * 2})" in err


def test_the_index_cost_note_says_what_the_approximation_loses_and_gains():
    """Losses and gains apart (a review, 2026-12-08: an index above the exact search was said as "near-equal cosines
    rounded apart"); rounding is said of a flat index only."""
    from mlsctl.evaluate.retrieval import index_cost_note

    def row(search, ar, r1, worse=0, better=0):
        counts = {"ranked_worse_than_exact": worse, "ranked_better_than_exact": better} if search == "index" else {}
        return {"search": search, "noise": 0.0, "AR@10": ar, "queries": 40, **counts,
                **{f"R@{k}": r1 if k == 1 else 1.0 for k in range(1, 11)}}

    settings = {"kind": "ivfpq", "nlist": 8, "nprobe": 32, "nprobe_effective": 8, "refine": 10}
    lossy = {"search": settings, "results": [row("index", 0.8, 0.5, 6, 2), row("exact", 0.9, 0.6)]}
    assert index_cost_note(lossy) == ("the index (nprobe 8 of 8 lists, refine 10) costs 10.0 points of AR@10 against "
                                      "the exact search (noise 0%): 6 of 40 query sets ranked worse than exactly "
                                      "(objects it did not return among its candidates), 2 better (higher-scoring "
                                      "objects it did not return, which could not outrank the query's own)")
    beats = {"search": settings, "results": [row("index", 1.0, 1.0, 0, 40), row("exact", 0.9, 0.0)]}
    assert index_cost_note(beats).startswith("the index (nprobe 8 of 8 lists, refine 10) scores 10.0 points of AR@10 "
                                             "above the exact search: 0 of 40 query sets ranked worse than exactly")
    assert "rounded apart" not in index_cost_note(beats)
    same = {"search": settings, "results": [row("index", 0.9, 0.6), row("exact", 0.9, 0.6)]}
    assert index_cost_note(same) == ("the index (nprobe 8 of 8 lists, refine 10) retrieves as the exact search does "
                                     "on these queries")
    flat = {"search": {"kind": "flat"}, "results": [row("index", 0.9, 0.5, 1, 0), row("exact", 0.9, 0.6)]}
    assert "near-equal cosines rounded apart" in index_cost_note(flat) and "(1 of 40 query sets ranked worse, 0 better)" \
        in index_cost_note(flat)


def test_an_ivfpq_gallerys_search_is_ranked_as_it_answers_and_loses_what_it_does_not_return(tmp_path, monkeypatch):
    """:func:`index_ranks` of the gallery's own search at search's k of 10: equal to the exact ranks within R@10 for a
    flat index; an IVF-PQ index searching 1 list of 8 misses objects the exact search ranks first, and ranks some
    queries better than exactly (an object it did not return cannot outrank the own), counted apart."""
    import torch

    from mlsctl.evaluate.retrieval import NEVER_FOUND, compared_ranks, cosine_scores, index_ranks, ranks, recall_at
    from mlsctl.gallery import Gallery, IndexSettings, write_gallery

    latents, ids, queries, manifest, g = clustered_gallery(400, 60)
    full = ranks(cosine_scores(queries, latents), torch.arange(60))
    exact = recall_at(full)
    found = {}
    for kind, settings in (("flat", IndexSettings()),
                           ("ivfpq", IndexSettings("ivfpq", nlist=8, m=4, nbits=6, nprobe=1, refine=1))):
        write_gallery(tmp_path / kind, ids, latents, [1] * 400, settings, manifest)
        rank = index_ranks(Gallery(tmp_path / kind).search_many(queries, 10), ids[:60])
        found[kind] = (recall_at(rank), rank)
        assert set(rank.tolist()) <= set(range(1, 11)) | {NEVER_FOUND}
    assert found["flat"][0] == exact
    assert found["ivfpq"][0][10] < exact[10]
    counts = compared_ranks(found["ivfpq"][1], full)
    assert counts["ranked_worse_than_exact"] > 0
    assert counts["ranked_better_than_exact"] == int((found["ivfpq"][1] < full.clamp(max=11)).sum())
    # the exact search, a block of stored latents at a time, ranks as the whole score matrix does within R@10, its
    # blocks shrinking with the queries (at most EXACT_SCORES_BYTES of scores a block)
    from mlsctl.evaluate import retrieval

    gallery = Gallery(tmp_path / "ivfpq")
    hard = torch.randn(60, 16, generator=g)  # queries unlike their objects: ranks beyond 11 too
    full = ranks(cosine_scores(hard, latents), torch.arange(60))
    for block, budget in ((64, 1 << 30), (1 << 16, 4 * 60 * 7)):
        monkeypatch.setattr(retrieval, "EXACT_BLOCK", block)
        monkeypatch.setattr(retrieval, "EXACT_SCORES_BYTES", budget)
        assert retrieval.exact_block(60) == min(block, 7 if budget < 1 << 20 else block)
        blocked = retrieval.exact_ranks(hard, gallery, gallery.live_rows(), torch.arange(60))
        assert torch.equal(blocked, full.clamp(max=11)) and (full > 11).any() and (full < 11).any()


def test_a_mean_cls_gallery_of_a_dino_run_scores_as_the_photo_folder_forms_mean_cls(finished_run, tmp_path, capsys):
    """A gallery of a run that is not MILE folds mean-CLS sets: --index scores them with its own model as the
    photo-folder form's mean-cls rows of the trained teacher score the same photos."""
    from test_gallery import object_photos

    gallery = object_photos(tmp_path / "gallery", objects=8)
    query = object_photos(tmp_path / "query", objects=8, noise_seed=1)  # other photos of the same objects
    cli_ok(capsys, "index", "build", str(gallery), "--run", str(finished_run[0]), "--out", str(tmp_path / "g"))
    common = ("--query", str(query), "--query-size", "all", "--noise", "0", "0.5")
    cli_ok(capsys, "eval", "retrieval", "--gallery", str(gallery), "--run", str(finished_run[0]), *common, "--out",
           str(tmp_path / "folders.json"))
    cli_ok(capsys, "eval", "retrieval", "--index", str(tmp_path / "g"), *common, "--out", str(tmp_path / "index.json"))
    expected = {r["noise"]: scores(r) for r in json.loads((tmp_path / "folders.json").read_text())["results"]
                if r["method"] == "mean-cls" and r["backbone"] == "trained"}
    rows = json.loads((tmp_path / "index.json").read_text())["results"]
    assert len(rows) == 4 and all(r["method"] == "mean-cls" and scores(r) == expected[r["noise"]] for r in rows), rows


def test_an_ivfpq_gallery_is_scored_by_its_own_search_settings_beside_the_exact_search(mile_run, tmp_path, capsys):
    """A gallery built with IVF-PQ (1 list, 5-bit codes, 1 candidate re-ranked a result) is searched with those
    settings, as `mlsctl search -k 10` answers: the table names the settings, the JSON records them, and the index
    rows are the ranks of the gallery's own search_many at k 10 (they may beat the exact rows: an object the index did
    not return cannot outrank the own; a review, 2026-12-08, found k 11 searched, re-ranking more candidates)."""
    from test_gallery import object_photos

    gallery = object_photos(tmp_path / "gallery", objects=40)
    query = object_photos(tmp_path / "query", objects=40, noise_seed=1)
    cli_ok(capsys, "index", "build", str(gallery), "--run", str(mile_run / "run"), "--out", str(tmp_path / "g"),
           "--index", "ivfpq", "--nlist", "1", "--pq-m", "4", "--pq-bits", "5", "--refine", "1")
    out, _ = cli_ok(capsys, "eval", "retrieval", "--index", str(tmp_path / "g"), "--query", str(query), "--noise", "0",
                    "--out", str(tmp_path / "r.json"))
    assert "index: ivfpq (nlist 1, m 4, 5 bits, nprobe 1 of the 32 asked, refine 1)" in out
    payload = json.loads((tmp_path / "r.json").read_text())
    assert payload["search"]["kind"] == "ivfpq" and payload["search"]["refine"] == 1 and payload["objects"] == 40
    index = next(r for r in payload["results"] if r["search"] == "index")
    assert payload["search"]["k"] == 10 and "ranked_worse_than_exact" in index
    assert "the index (nprobe 1 of 1 lists, refine 1) " in out and "rounded apart" not in out
    assert payload["gallery_state"]["rows"] == 40 and payload["gallery_state"]["data"]
    # the index row is the recall of the ranks derived from the gallery's search_many(latents, 10)
    import torch

    from mlsctl.evaluate.retrieval import index_ranks, recall_at
    from mlsctl.gallery import Gallery, load_set_model, object_folders

    target = Gallery(tmp_path / "g")
    model = load_set_model(str(mile_run / "run"))
    groups = object_folders(query)
    from mlsctl.evaluate.retrieval import sample_sets

    drawn = sample_sets([list(range(len(groups[o]))) for o in groups], 4, 0)  # --query-size 4, --seed 0: the defaults
    latents = torch.stack([model.fold(None, *model.image_tokens([groups[o][i] for i in rows]))
                           for o, rows in zip(groups, drawn)]).float()
    expected = recall_at(index_ranks(target.search_many(latents, 10), list(groups)))
    assert [index[f"R@{k}"] for k in range(1, 11)] == [expected[k] for k in range(1, 11)]


def refused_before_the_model(*args: str, capsys) -> str:
    code, out, err = cli("eval", "retrieval", *args, capsys=capsys)
    assert code == 2 and "model:" not in err and "Traceback" not in err and err.count("\n") == 1, (code, out, err)
    return err


def test_noise_with_one_query_object_in_the_gallery_is_refused_before_the_model(mile_run, flat_gallery, tmp_path,
                                                                                capsys):
    """A review (2026-12-08): noise lends photos of the other query objects; with one in the gallery there are none,
    and the run stopped after the model loaded with "internal error (ValueError: high <= 0)"."""
    query = tmp_path / "query"
    shutil.copytree(mile_run / "query" / "obj3", query / "obj3")
    shutil.copytree(mile_run / "query" / "obj1", query / "stranger")
    err = refused_before_the_model("--index", str(flat_gallery), "--query", str(query), "--noise", "0", "0.5",
                                   capsys=capsys)
    assert "--noise 0.5 replaces query photos with photos of the other query objects, but only one" in err
    assert "('obj3')" in err and "give --noise 0" in err


def test_query_photos_are_compared_with_the_gallery_per_object(mile_run, flat_gallery, tmp_path, capsys):
    """A review (2026-12-08): a gallery that recorded the digests of one object's photos said it had compared every
    query photo, and its own photos as queries scored 100 % with no note. Objects whose photo count exceeds their
    recorded digests are counted unchecked, and said."""
    from mlsctl.gallery import Gallery, write_gallery

    full = Gallery(flat_gallery)
    records = full.read_photo_records()
    obj0 = full.ids.index("obj0")
    partial = tmp_path / "partial"
    write_gallery(partial, full.ids, torch_latents(full), [full.count(o) for o in full.ids], full.settings,
                  {"kind": "mlsctl-gallery", "model": full.manifest["model"]},
                  photo_records=records[records["row"] == obj0])
    query = tmp_path / "query"
    shutil.copytree(mile_run / "query" / "obj0", query / "obj0")
    for i in range(1, 6):  # the gallery's own photos of the objects whose digests it did not record
        shutil.copytree(mile_run / "gallery" / f"obj{i}", query / f"obj{i}")
    out, _ = cli_ok(capsys, "eval", "retrieval", "--index", str(partial), "--query", str(query), "--noise", "0",
                    "--out", str(tmp_path / "r.json"))
    assert (f"note: gallery {partial} does not record the digests of every photo folded into 5 query objects (obj1, "
            f"obj2, obj3, obj4, obj5), so query photos that are those objects' own could not be told apart") in out
    payload = json.loads((tmp_path / "r.json").read_text())
    assert payload["query_objects_unchecked"] == 5 and payload["query_photos_compared_with_gallery"] is False
    # a photo held by another object than the query's: the refusal names that object
    shutil.copy(mile_run / "gallery" / "obj0" / "0.png", query / "obj1" / "x.png")
    err = refused_before_the_model("--index", str(partial), "--query", str(query), capsys=capsys)
    assert "holds already (the same bytes, folded into object 'obj0', not the query's 'obj1')" in err


def clustered_gallery(objects: int, queries: int):
    """Latents of ``objects`` objects around 8 centres (16 wide), their ids, noisy queries of the first ``queries``
    objects, a manifest, and the generator drawn from (for more draws): a gallery on which an IVF-PQ search of 1
    list of 8 misses some objects."""
    import torch

    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=1)
    latents = 3 * (centres[torch.randint(0, 8, (objects,), generator=g)] + 0.4 * torch.randn(objects, 16, generator=g))
    asked = latents[:queries] + 0.8 * torch.randn(queries, 16, generator=g)
    manifest = {"kind": "mlsctl-gallery", "model": {"run": "/r", "step": 1, "fingerprint": "f" * 64}}
    return latents, [f"o{i}" for i in range(objects)], asked, manifest, g


def torch_latents(gallery):
    import torch

    return torch.stack([gallery.latent(o) for o in gallery.ids])


def test_query_ids_that_read_like_stored_ids_are_named(mile_run, flat_gallery, tmp_path, capsys):
    """A review (2026-12-08): a query folder whose name reads as a stored id but is another string (another Unicode
    composition, an invisible character) was "never in it" with no hint. The stored id it reads like is named, in
    the note and in the refusal; the ids are not matched."""
    query = tmp_path / "query"
    shutil.copytree(mile_run / "query", query)
    (query / "obj1").rename(query / "obj\u200b1")
    out, _ = cli_ok(capsys, "eval", "retrieval", "--index", str(flat_gallery), "--query", str(query), "--noise", "0",
                    "--out", str(tmp_path / "r.json"))
    note = next(line for line in out.splitlines() if "left out of R@k" in line)
    assert "1 never in it" in note and "reads like the gallery's 'obj1'" in note and "rename the query folder" in note
    assert json.loads((tmp_path / "r.json").read_text())["queries"] == 5
    only = tmp_path / "only"
    shutil.copytree(query / "obj\u200b1", only / "obj\u200b1")
    err = refused_before_the_model("--index", str(flat_gallery), "--query", str(only), capsys=capsys)
    assert "none of the 1 query object of" in err and "reads like the gallery's 'obj1'" in err


def test_a_photo_too_small_is_refused_before_the_model_by_both_forms(mile_run, flat_gallery, tmp_path, capsys):
    """A review (2026-12-08): a 7x7 query photo stopped --index after the model had loaded and embedded the others,
    while the photo-folder form read it. Both refuse it now, by its header, before the model: search's rule."""
    from PIL import Image

    query = tmp_path / "query"
    shutil.copytree(mile_run / "query", query)
    Image.new("RGB", (7, 7)).save(query / "obj2" / "tiny.png")
    for form in (("--index", str(flat_gallery)), ("--gallery", str(mile_run / "gallery"), "--run",
                                                 str(mile_run / "run"))):
        err = refused_before_the_model(*form, "--query", str(query), "--noise", "0", capsys=capsys)
        assert f"cannot read {query / 'obj2' / 'tiny.png'}: 7x7 is too small to show an object" in err


def test_the_gallerys_own_run_trained_on_since_is_refused_before_the_model(mile_run, flat_gallery, tmp_path, capsys):
    """Without --run the gallery's own run is checked too, from its config and checkpoints alone: its latest step is
    not the one the gallery was built with."""
    gallery = tmp_path / "g"
    shutil.copytree(flat_gallery, gallery)
    manifest = json.loads((gallery / "gallery.json").read_text())
    built = manifest["model"]["step"]
    manifest["model"]["step"] = built + 100
    (gallery / "gallery.json").write_text(json.dumps(manifest))
    err = refused_before_the_model("--index", str(gallery), "--query", str(mile_run / "query"), capsys=capsys)
    assert "is no longer the model gallery" in err and f"step {built + 100} then, {built} now" in err


def test_the_index_rows_are_what_search_k_10_answers(tmp_path):
    """A review (2026-12-08): the eval searched k 11 while `mlsctl search` answers 10, and IVF-PQ re-ranks refine × k
    candidates, so its R@k were not search's. The index row's ranks are those derived from search_many(latents, 10);
    with k 11 they differ on this gallery (the test tells the two apart)."""
    from mlsctl.evaluate.retrieval import GalleryQueries, _search_and_rank, index_ranks, recall_at
    from mlsctl.gallery import Gallery, IndexSettings, write_gallery

    latents, ids, queries, manifest, _ = clustered_gallery(2000, 300)
    write_gallery(tmp_path / "g", ids, latents, [1] * 2000,
                  IndexSettings("ivfpq", nlist=8, m=4, nbits=6, nprobe=1, refine=1), manifest)
    target = Gallery(tmp_path / "g")

    class OnePhotoSets:  # a query's one "photo" is its latent
        kind = "mile"

        @staticmethod
        def fold(latent, cls, tokens):
            return cls.mean(0)

    asked = GalleryQueries(ids[:300], [[]] * 300, [], [], 300, ids, target.live_rows())
    rows, _ = _search_and_rank(target, OnePhotoSets(), asked, [[i] for i in range(300)], queries, None, [0.0], 0)
    index = next(r for r in rows if r["search"] == "index")
    by_search = {k: recall_at(index_ranks(target.search_many(queries, k), ids[:300])) for k in (10, 11)}
    assert [index[f"R@{k}"] for k in range(1, 11)] == [by_search[10][k] for k in range(1, 11)]
    assert by_search[10] != by_search[11]


def test_a_drawn_query_photo_is_the_one_the_photo_folder_form_draws(mile_run, flat_gallery, tmp_path, capsys):
    """`--query-size 1` of 2 photos an object: both forms draw the same photo of each object with the seed (the
    equality test above takes every photo, so the draw was untested), for two seeds that draw differently."""
    query = blended_queries(mile_run, tmp_path / "query")
    for seed in ("0", "5"):
        common = ("--query", str(query), "--query-size", "1", "--noise", "0", "--seed", seed)
        folders, indexed = tmp_path / f"folders-{seed}.json", tmp_path / f"index-{seed}.json"
        cli_ok(capsys, "eval", "retrieval", "--gallery", str(mile_run / "gallery"), "--run", str(mile_run / "run"),
               *common, "--out", str(folders))
        cli_ok(capsys, "eval", "retrieval", "--index", str(flat_gallery), *common, "--out", str(indexed))
        expected = next(scores(r) for r in json.loads(folders.read_text())["results"]
                        if r["method"] == "mile" and r["backbone"] == "trained")
        payload = json.loads(indexed.read_text())
        assert payload["query_set_sizes"] == {"min": 1, "max": 1, "mean": 1.0} and payload["photos_embedded"] == 6
        assert all(scores(r) == expected for r in payload["results"]), (expected, payload["results"])
    from mlsctl.evaluate.retrieval import sample_sets

    assert sample_sets([[0, 1]] * 6, 1, 0) != sample_sets([[0, 1]] * 6, 1, 5)  # the seeds draw other photos


def test_the_gallerys_own_run_of_another_configuration_is_named_as_the_gallerys_not_as_run(mile_run, flat_gallery,
                                                                                            tmp_path, capsys):
    """Without --run the sentence names the gallery's run (not a --run the user never gave) and the way out is a
    rebuild or the run it was built with, not "leave --run out"."""
    gallery = tmp_path / "g"
    shutil.copytree(flat_gallery, gallery)
    manifest = json.loads((gallery / "gallery.json").read_text())
    manifest["model"]["resolution"] = manifest["model"]["resolution"] + 8  # as if its config.yaml changed since
    (gallery / "gallery.json").write_text(json.dumps(manifest))
    err = refused_before_the_model("--index", str(gallery), "--query", str(mile_run / "query"), capsys=capsys)
    assert "the gallery's run" in err and "--run " not in err.split("; ")[0] and "leave --run out" not in err, err
    assert "rebuild the gallery (mlsctl index build --overwrite)" in err
    err = refused_before_the_model("--index", str(gallery), "--query", str(mile_run / "query"),
                                   "--run", str(mile_run / "run"), capsys=capsys)
    assert err.startswith("error: --run ") and "leave --run out" in err, err


def test_an_object_folder_holding_one_photo_twice_is_checked_not_said_unchecked(mile_run, tmp_path, capsys):
    """A review (2026-12-08): the build recorded each distinct photo once while counting every file, so an object
    folder holding the same photo twice was said "not checked" by eval retrieval --index. The build records every
    photo it folds."""
    from mlsctl.gallery import Gallery

    source = tmp_path / "gallery-photos"
    shutil.copytree(mile_run / "gallery", source)
    first = sorted((source / "obj0").iterdir())[0]
    shutil.copyfile(first, source / "obj0" / "again.png")  # another file, the same bytes
    out_gallery = tmp_path / "g"
    code, _, err = cli("index", "build", str(source), "--run", str(mile_run / "run"), "--out", str(out_gallery))
    assert code == 0, err
    built = Gallery(out_gallery)
    assert built.photos_known() == sum(built.count(o) for o in built.ids)
    out, _ = cli_ok(capsys, "eval", "retrieval", "--index", str(out_gallery), "--query", str(mile_run / "query"),
                    "--noise", "0", "--out", str(tmp_path / "r.json"))
    assert "does not record the digests" not in out, out
    assert json.loads((tmp_path / "r.json").read_text())["query_objects_unchecked"] == 0


def test_the_index_cost_note_goes_to_stderr_under_json(mile_run, flat_gallery, tmp_path, capsys):
    """A review (2026-12-08): under --json the notes go to stderr, but the index-cost note was left out."""
    code, out, err = cli("eval", "retrieval", "--index", str(flat_gallery), "--query", str(mile_run / "query"),
                         "--noise", "0", "--json", "--out", str(tmp_path / "r.json"), capsys=capsys)
    assert code == 0, err
    assert json.loads(out)["command"] == "eval retrieval"
    assert "the gallery's index is flat: it searches exactly, so its rows equal the exact ones" in err, err
