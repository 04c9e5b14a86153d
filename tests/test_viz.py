"""viz pca: the model's input pixel for pixel beside the PCA map, a legend, the components' variance."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_feature_folder


def test_pca_components_give_each_components_share_of_the_variance():
    from mlsctl.viz import pca_components

    generator = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(16, 3, generator=generator, dtype=torch.float64))
    signs = torch.tensor([[1.0, 1, 1], [1, 1, -1], [1, -1, 1], [1, -1, -1], [-1, 1, 1], [-1, 1, -1], [-1, -1, 1],
                          [-1, -1, -1]], dtype=torch.float64)
    coordinates = signs * torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)  # variances 9, 4, 1
    dense = (coordinates @ basis.T).reshape(2, 2, 2, 16)
    colours, shares = pca_components(dense)
    assert shares == pytest.approx([9 / 14, 4 / 14, 1 / 14])
    assert colours.shape == (2, 2, 2, 3) and float(colours.min()) >= 0 and float(colours.max()) <= 1


def test_viz_pca_draws_the_input_pixel_for_pixel_with_a_legend(tmp_path):
    from mlsctl.features import Features
    from mlsctl.viz import features_pca

    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    pixels[::2, ::2] = 255  # one-pixel dots: a bicubic enlargement would blur them
    (tmp_path / "images").mkdir()
    Image.fromarray(pixels).save(tmp_path / "images" / "dots.png")
    folder = write_feature_folder(tmp_path / "f", ["dots.png"], torch.randn(1, 8), torch.randn(1, 4, 4, 8),
                                  input_root=tmp_path / "images")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["preprocessing"] == {"resize": "square", "resolution": 32}
    out = features_pca(Features(folder), tmp_path / "pca.png")  # default cell: 32 x 4 = 128
    figure = np.asarray(Image.open(out).convert("RGB"))
    drawn = figure[8:136, 8:136]
    assert np.array_equal(drawn, np.kron(pixels, np.ones((4, 4, 1), dtype=np.uint8)))  # every input pixel a 4x4 block
    grid_height = 8 + 128 + 14 + 8
    legend = figure[grid_height:]
    assert legend.shape[0] > 30 and (legend < 100).any()  # the legend's text under the grid


def test_viz_pca_never_draws_among_the_images_of_its_features(tmp_path, capsys):
    """As bank plot (a new user, 2026-12-06): pca.png in the features' image folder would become one of them."""
    from conftest import cli

    images = tmp_path / "images"
    images.mkdir()
    folder = write_feature_folder(tmp_path / "feats", ["a.png"], torch.randn(1, 8), dense=torch.randn(1, 2, 2, 8),
                                  input_root=images)
    code, _, err = cli("viz", "pca", str(folder), "--out", str(images / "pca.png"), capsys=capsys)
    assert code == 2 and f"is inside {images}, the images of the feature folder {folder}" in err
    assert list(images.iterdir()) == []


def test_captions_keep_a_paths_end_and_cosines_three_decimals():
    """A new user (2026-12-06): captions read "images/00000…" under every tile, and 0.995 as "cos 1.00"."""
    from PIL import Image, ImageDraw

    from mlsctl.bank_inspect import Neighbour, neighbour_tiles
    from mlsctl.viz import fitted

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    path = "products/tr00012/this-is-a-long-folder/000123.png"
    assert fitted(draw, path, 96, keep_end=True).endswith("000123.png") and fitted(draw, path, 96).startswith("prod")
    assert fitted(draw, path, 96, keep_end=True).startswith("…") and fitted(draw, "short", 96) == "short"

    class NoSources:
        def load(self, image_id):
            return None, f"missing: /data/{path}"

    near = Neighbour(slot=0, score=0.9954, step=12, image_id=3, image=None, box=None, region=None, label=None)
    [(tile, caption)] = neighbour_tiles([near], NoSources(), 96)
    # the payload counts steps from 0, the caption as metrics.jsonl does (from 1)
    assert tile is None and caption.split("\n") == ["cos 0.995", "step 13", f"missing: /data/{path}"]


def test_captions_write_characters_the_font_lacks_as_escapes():
    """Carried since 2026-12-06: Chinese, Japanese and Korean file names came out as rows of identical boxes (the
    caption font, DejaVu Sans, has none of their glyphs); each such character is now its escape, so two such names
    differ on the tile as on disk. Characters the font has (accents, arrows) stay as they are."""
    from PIL import Image, ImageDraw

    from mlsctl.viz import drawable, fitted

    assert drawable("猫/1.png") == "\\u732b/1.png" and drawable("犬/1.png") == "\\u72ac/1.png"
    assert drawable("café → ü.png") == "café → ü.png" and drawable("\U0002000b") == "\\U0002000b"
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    assert fitted(draw, "猫.png", 96) == "\\u732b.png"
    assert fitted(draw, "图片/猫猫猫猫猫猫猫猫猫猫猫猫.png", 96, keep_end=True).endswith(".png")  # cut after escaping


def test_a_long_path_keeps_the_folder_that_tells_it_apart(tmp_path):
    """A new user's probe (2026-12-07): In-shop's paths cut to one line at their start read "…/01_1_front.jpg" under
    every tile of the report's neighbours; the folder nearest the file now gets a line of its own."""
    from PIL import Image, ImageDraw

    from mlsctl.viz import neighbour_grid, path_lines

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    first, second = (path_lines(draw, f"WOMEN/Blouses_Shirts/id_0000{i}/01_1_front.jpg", 96) for i in (1001, 2002))
    assert first != second and first[1] == second[1] == "01_1_front.jpg"
    assert first[0].endswith("id_00001001/") and second[0].endswith("id_00002002/")
    assert path_lines(draw, "cat/1.png", 96) == ["cat/1.png"]
    [line] = path_lines(draw, "no-folder-but-a-rather-long-name.png", 96)
    assert line.startswith("…") and line.endswith("long-name.png")
    tiles = [(Image.new("RGB", (96, 96)), f"cos 0.9\nstep 1\nWOMEN/Blouses_Shirts/id_0000100{i}/01_1_front.jpg")
             for i in range(2)]
    out = neighbour_grid(Image.new("RGB", (96, 96)), tiles, tmp_path / "grid.png", title="t", cell=96)
    assert Image.open(out).size == (3 * (96 + 8) + 8, 18 + 96 + 4 * 12 + 2 + 8 + 8)  # four caption lines


def test_captions_name_a_source_image_by_its_path_under_the_data_root(tmp_path):
    """A new user's probe (2026-12-07): a file directly under data.root was captioned with the root folder's name
    (``images/top.png``), and a deeper one lost its upper folders; the table beside the grid says the path under
    data.root."""
    from mlsctl.bank_inspect import Neighbour, SourceImages, neighbour_tiles

    root = tmp_path / "images"
    (root / "shop" / "aisle").mkdir(parents=True)
    for relpath in ("top.png", "shop/aisle/deep.png"):
        Image.new("RGB", (8, 8), (90, 40, 20)).save(root / relpath)
    sources = SourceImages.__new__(SourceImages)  # as a run whose images.txt lists the two
    vars(sources).update(root=root, note=None, relpaths=["top.png", "shop/aisle/deep.png"])
    found = [Neighbour(slot=i, score=0.5, step=0, image_id=i, image=None, box=None, region=None, label=None)
             for i in range(2)]
    captions = [caption.split("\n")[-1] for _, caption in neighbour_tiles(found, sources, 32)]
    assert captions == ["top.png", "shop/aisle/deep.png"]


def test_the_library_never_draws_over_a_picture_it_did_not_draw(tmp_path):
    """A code-health review (2026-12-07): only the CLI asked, so a library call of a drawer replaced an input
    image at its ``out``; an earlier picture of mlsctl's is replaced."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from mlsctl.errors import UserError
    from mlsctl.outputs import save_figure, save_image

    photo = tmp_path / "photo.png"
    Image.new("RGB", (4, 4), (1, 2, 3)).save(photo)
    before = photo.read_bytes()
    figure = plt.figure()
    for save in (lambda out: save_image(Image.new("RGB", (4, 4)), out), lambda out: save_figure(figure, out, dpi=20)):
        with pytest.raises(UserError, match="is not a picture mlsctl drew"):
            save(photo)
        assert photo.read_bytes() == before
        save(tmp_path / "ours.png")
        save(tmp_path / "ours.png")  # its own earlier picture: replaced
    plt.close(figure)


def test_a_bank_scatter_draws_dollar_signs_as_written_and_returns_its_legend(tmp_path):
    """Run names and image paths hold ``$`` (the 19th session drew them as math, or failed); the legend's
    groups are what ``bank plot --json`` prints."""
    from mlsctl.viz import scatter_plot

    values = torch.tensor([0, 0, 1, -1])
    legend = scatter_plot(torch.randn(4, 2, generator=torch.Generator().manual_seed(0)), values, tmp_path / "s.png",
                          title="$x^$", colour_by="label", label_names={0: "exp$^_1$", 1: "b"}, unlabelled="not $in")
    assert [(g["kind"], g["name"], g["count"]) for g in legend] == [("unlabelled", "not $in", 1),
                                                                    ("class", "exp$^_1$", 2), ("class", "b", 1)]
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_viz_pca_says_how_many_source_images_it_could_not_read(tmp_path, capsys):
    # a new user's probe (2026-12-07): grey "image missing" tiles, and only "wrote pca.png" on the console
    from conftest import cli, write_feature_folder

    folder = write_feature_folder(tmp_path / "f", ["a.png", "b.png"], torch.randn(2, 8), torch.randn(2, 2, 2, 8),
                                  input_root=tmp_path / "moved")
    code, _, err = cli("viz", "pca", str(folder), "--out", str(tmp_path / "p.png"), capsys=capsys)
    assert code == 0 and "note: 2 of the 2 source images could not be read" in err, err


def test_a_legend_names_the_classes_beyond_those_drawn_in_the_right_number():
    # looked at (2026-12-07): a bank plot of 11 mask classes said "1 other labels (9)"
    from mlsctl.viz import legend_groups

    eleven = torch.arange(11).repeat_interleave(torch.arange(20, 9, -1))
    assert [g["name"] for g in legend_groups(eleven) if g["kind"] == "other"] == ["1 other label"]
    twelve = torch.arange(12).repeat_interleave(torch.arange(21, 9, -1))
    assert [g["name"] for g in legend_groups(twelve, other_name="images") if g["kind"] == "other"] == ["2 other images"]


def test_a_bank_scatter_of_one_age_invents_no_colour_range_and_holds_a_flat_axis(tmp_path, monkeypatch):
    """A new user's probe (2026-12-08): two entries of one age got a colour bar from 0.9 to 1.1, and their PCA's
    second component, rounding noise at 1e-16, filled the panel's height."""
    import mlsctl.viz as viz

    figures = []
    real = viz.save_figure
    monkeypatch.setattr(viz, "save_figure", lambda figure, *a, **k: (figures.append(figure), real(figure, *a, **k)))
    points = torch.tensor([[-0.6, 0.0], [0.6, 0.0]])
    viz.scatter_plot(points, torch.tensor([1, 1]), tmp_path / "s.png", title="t", colour_by="age",
                     note="principal component 2 has no variance")
    (ax,) = figures[-1].axes  # no colour bar beside it
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["every entry: age 1 step"]
    assert ax.get_ylim() == pytest.approx((-1.0, 1.0))
    assert any("principal component 2 has no variance" in t.get_text() for t in ax.texts)
