"""bench.claim_table: where the domain LVM's curve reaches a competitor's 100 %-labels accuracy."""
import math
from pathlib import Path

import pytest

from bench.claim_table import curves, finetune_curves, fraction_to_match


def test_fraction_to_match_interpolates_in_log_fraction():
    curve = {0.01: 0.70, 0.1: 0.80, 1.0: 0.90}
    assert fraction_to_match(curve, 0.85) == pytest.approx(math.sqrt(0.1))  # half-way between 10 % and 100 % in log
    assert fraction_to_match(curve, 0.80) == pytest.approx(0.1)
    assert fraction_to_match(curve, 0.65) == pytest.approx(0.01)  # already there at the smallest fraction
    assert fraction_to_match(curve, 0.95) is None  # never reached: said so, not extrapolated


def test_curves_keep_only_named_features_and_methods():
    probe = {"rows": [
        {"features": "lvm (layer 5)", "method": "linear", "fraction": 0.1, "acc_mean": 0.8, "acc_std": 0.01, "runs": 3},
        {"features": "lvm (layer 5)", "method": "finetune", "fraction": 0.1, "acc_mean": 0.82, "runs": 3},
        {"features": "raw pixels", "method": "linear", "fraction": 1.0, "acc_mean": 0.84, "runs": 1},
        {"features": "random-init lvm", "method": "linear", "fraction": 1.0, "acc_mean": 0.5, "runs": 1},
    ]}
    got = curves(probe, {"lvm": "LVM", "raw pixels": "pixels"})
    assert got == {"LVM": {0.1: (0.8, 0.01, 3)}, "LVM, finetune": {0.1: (0.82, 0.0, 3)},
                   "pixels": {1.0: (0.84, 0.0, 1)}}


def test_a_table_made_again_without_notes_keeps_its_findings(tmp_path):
    import json

    from bench.claim_table import main

    probe = {"rows": [{"features": "lvm (layer 5)", "method": "linear", "fraction": f, "acc_mean": a, "runs": 1}
                      for f, a in ((0.1, 0.8), (1.0, 0.86))]}
    (tmp_path / "d.json").write_text(json.dumps(probe))
    args = ["--domain", str(tmp_path / "d.json"), "--ood", str(tmp_path / "d.json"), "--finetune", str(tmp_path / "none"),
            "--out", str(tmp_path / "claim")]
    main([*args, "--note", "Findings: the domain LVM wins."])
    main(args)  # regenerated, e.g. after a new input row
    assert json.loads((tmp_path / "claim.json").read_text())["notes"] == ["Findings: the domain LVM wins."]
    assert "Findings: the domain LVM wins." in (tmp_path / "claim.md").read_text()


def test_commands_passed_again_are_listed_once_in_their_first_order(tmp_path):
    import json

    from bench.claim_table import main

    probe = {"rows": [{"features": "lvm (layer 5)", "method": "linear", "fraction": 1.0, "acc_mean": 0.86, "runs": 1}]}
    (tmp_path / "d.json").write_text(json.dumps(probe))
    main(["--domain", str(tmp_path / "d.json"), "--ood", str(tmp_path / "d.json"), "--finetune", str(tmp_path / "none"),
          "--out", str(tmp_path / "claim"), "--commands", "lvm train", "lvm probe", "lvm train", "lvm probe --x"])
    assert json.loads((tmp_path / "claim.json").read_text())["commands"] == ["lvm train", "lvm probe", "lvm probe --x"]
    assert (tmp_path / "claim.md").read_text().count("- `lvm train`") == 1


def test_a_block_holds_its_domain_and_twin_rows_with_and_without_the_pixels_and_matches_within_itself(tmp_path):
    """--block LABEL DOMAIN OOD: four rows (states and + pixels, mirror-averaged row names included), each twin row
    matched against its own block's domain row, not against a better row of another block."""
    import json

    from bench.claim_table import main

    def probe(path, rows):
        path.write_text(json.dumps({"rows": [{"features": f, "method": "linear", "fraction": fr, "acc_mean": a,
                                              "runs": 1} for f, fr, a in rows]}))
        return str(path)

    dom = probe(tmp_path / "d.json", [("lvm (layer 5), mirrored", 0.1, 0.80), ("lvm (layer 5), mirrored", 1.0, 0.90),
                                      ("lvm (layer 5) + pixels, mirrored", 0.1, 0.70),
                                      ("lvm (layer 5) + pixels, mirrored", 1.0, 0.75)])
    ood = probe(tmp_path / "o.json", [("lvm (layer 6), mirrored", 1.0, 0.85),
                                      ("lvm (layer 6) + pixels, mirrored", 1.0, 0.72)])
    other = probe(tmp_path / "x.json", [("lvm (layer 5)", 0.1, 0.99), ("lvm (layer 5)", 1.0, 0.99)])
    main(["--block", "mirrored", dom, ood, "--domain", other, "--ood", other, "--finetune", "",
          "--out", str(tmp_path / "claim")])
    rows = json.loads((tmp_path / "claim.json").read_text())["rows"]
    assert rows["domain LVM, mirrored, linear"]["accuracy"]["1.0"][0] == 0.90
    assert rows["domain LVM, mirrored, linear + pixels"]["accuracy"]["1.0"][0] == 0.75
    twin = rows["out-of-domain LVM (skimage crops), mirrored, linear"]
    assert twin["block"] == "mirrored" and twin["domain_matches_at"].startswith("32 %")  # halfway in log-fraction: 10 ** -0.5
    twin_px = rows["out-of-domain LVM (skimage crops), mirrored, linear + pixels"]
    assert twin_px["domain_matches_at"].startswith("25 %")  # 0.72 in its block's 0.70 -> 0.75: 10 ** -0.6


def test_finetune_rows_average_over_subsets_and_refit_rows_count_their_lpft_score():
    ft = [{"lever": "lpft", "fraction": 0.1, "test_acc": 0.80},  # subset 0 (rows from before subsets were recorded)
          {"lever": "lpft+refit", "fraction": 0.1, "subset": 1, "test_acc": 0.84, "test_acc_before_refit": 0.82},
          {"lever": "lpft+refit", "fraction": 0.1, "subset": 2, "test_acc": 0.86, "test_acc_before_refit": 0.84},
          {"lever": "linear", "fraction": 0.1, "subset": 1, "test_acc": 0.5},  # not fine-tuning: left out
          {"lever": "lpft", "fraction": 1.0, "test_acc": 0.9}]
    got = finetune_curves(ft)
    assert set(got) == {"LP-FT fine-tuning", "LP-FT fine-tuning + head refit"}
    mean, std, runs = got["LP-FT fine-tuning"][0.1]
    assert (mean, runs) == (pytest.approx(0.82), 3) and std == pytest.approx(0.02 * math.sqrt(2 / 3))  # ddof 0
    assert got["LP-FT fine-tuning + head refit"][0.1] == (pytest.approx(0.85), pytest.approx(0.01), 2)
    assert got["LP-FT fine-tuning"][1.0] == (0.9, 0.0, 1) and 1.0 not in got["LP-FT fine-tuning + head refit"]


def test_out_of_domain_rows_match_their_own_recipe_and_baselines_the_best_domain_row(tmp_path):
    import json

    from bench.claim_table import main

    def probe(path, accs, features="lvm (layer 5)"):
        path.write_text(json.dumps({"rows": [{"features": features, "method": "linear", "fraction": f, "acc_mean": a,
                                              "runs": 1} for f, a in accs]}))
        return str(path)

    ood = json.loads(Path(probe(tmp_path / "o.json", ((0.1, 0.75), (1.0, 0.88)))).read_text())
    ood["rows"].append({"features": "raw pixels", "method": "linear", "fraction": 1.0, "acc_mean": 0.86, "runs": 1})
    (tmp_path / "o.json").write_text(json.dumps(ood))
    args = ["--domain", probe(tmp_path / "d.json", ((0.1, 0.80), (1.0, 0.85))), "--ood", str(tmp_path / "o.json"),
            "--current", probe(tmp_path / "c.json", ((0.1, 0.83), (1.0, 0.90))),
            "--current-ood", probe(tmp_path / "co.json", ((0.1, 0.70), (1.0, 0.83))),
            "--current-label", "domain LVM, later recipe",  # a label like the other block's: roles, not names, decide
            "--finetune", str(tmp_path / "none"), "--out", str(tmp_path / "claim")]
    main(args)
    rows = json.loads((tmp_path / "claim.json").read_text())["rows"]
    assert rows["domain LVM, later recipe, linear"]["accuracy"]["1.0"][0] == 0.90
    # the earlier recipe's out-of-domain twin (88 % at 100 %) is above its own domain row (85 %), not matched
    # against the later recipe's 90 %
    assert rows["out-of-domain LVM (skimage crops), linear"]["domain_matches_at"].startswith("not reached")
    # the later recipe's twin (83 %) is reached by its own domain rows at 10 % already
    assert rows["out-of-domain LVM, current default's recipe (skimage crops), linear"]["domain_matches_at"] == \
        "10 % labels"
    # a baseline (86 %) is matched against the best domain row of either recipe: between 10 % (83 %) and 100 % (90 %)
    assert rows["raw pixels"]["domain_matches_at"] == f"{100 * 10 ** (-1 + 3 / 7):.2g} % labels"


def test_rows_of_one_name_and_a_twin_without_its_recipe_are_refused(tmp_path):
    import json

    from bench.claim_table import main

    path = tmp_path / "p.json"
    path.write_text(json.dumps({"rows": [{"features": "lvm (layer 5)", "method": "linear", "fraction": 1.0,
                                          "acc_mean": 0.8, "runs": 1}]}))
    base = ["--domain", str(path), "--ood", str(path), "--finetune", str(tmp_path / "none"), "--out", str(tmp_path / "c")]
    with pytest.raises(SystemExit, match="two rows are named"):
        main([*base, "--current", str(path), "--current-label", "domain LVM (Fashion-MNIST)"])
    with pytest.raises(SystemExit):  # argparse's error: --current-ood needs --current
        main([*base, "--current-ood", str(path)])
    assert not (tmp_path / "c.json").exists()


def test_the_pixels_block_matches_its_twin_and_counts_for_the_baselines(tmp_path):
    import json

    from bench.claim_table import main

    def probe(name, accs, features="lvm (layer 6)"):
        rows = [{"features": features, "method": "linear", "fraction": f, "acc_mean": a, "runs": 1} for f, a in accs]
        (tmp_path / name).write_text(json.dumps({"rows": rows}))
        return str(tmp_path / name)

    base = ["--domain", probe("d.json", ((0.1, 0.80), (1.0, 0.85))),
            "--ood", probe("o.json", ((0.1, 0.75), (1.0, 0.84))) , "--finetune", str(tmp_path / "none"),
            "--current", probe("c.json", ((0.1, 0.83), (1.0, 0.87))),
            "--current-ood", probe("co.json", ((0.1, 0.82), (1.0, 0.86)))]
    pixels = ["--current-pixels", probe("cp.json", ((0.1, 0.85), (1.0, 0.89)), "lvm (layer 6) + pixels"),
              "--current-ood-pixels", probe("cop.json", ((0.1, 0.84), (1.0, 0.88)), "lvm (layer 5) + pixels")]
    ood = json.loads((tmp_path / "o.json").read_text())
    ood["rows"].append({"features": "raw pixels", "method": "linear", "fraction": 1.0, "acc_mean": 0.88, "runs": 1})
    (tmp_path / "o.json").write_text(json.dumps(ood))
    main([*base, *pixels, "--out", str(tmp_path / "claim")])
    rows = json.loads((tmp_path / "claim.json").read_text())["rows"]
    px, px_ood = "current default LVM (Fashion-MNIST), linear + pixels", \
        "out-of-domain LVM, current default's recipe (skimage crops), linear + pixels"
    assert rows[px]["block"] == rows[px_ood]["block"] == "current + pixels" and rows[px]["role"] == "domain"
    # the twin with pixels (88 %) is matched against the pixels block (85 -> 89 %), not the plain one (83 -> 87 %)
    assert rows[px_ood]["domain_matches_at"] == f"{100 * 10 ** (-1 + 3 / 4):.2g} % labels"
    assert rows["raw pixels"]["domain_matches_at"] == f"{100 * 10 ** (-1 + 3 / 4):.2g} % labels"  # best: the pixels row
    with pytest.raises(SystemExit):  # a twin without its block
        main([*base, "--current-ood-pixels", str(tmp_path / "cop.json"), "--out", str(tmp_path / "x")])


def test_probes_run_with_pixels_both_split_into_a_plain_and_a_pixels_block(tmp_path):
    """One probe.json per checkpoint (``lvm probe --pixels both``) gives the states rows and the states + pixels rows,
    each twin matched within its own block; a pixels row never lands in the plain block (or the reverse)."""
    import json

    from bench.claim_table import main

    def probe(name, plain, joint, extra=()):
        rows = [{"features": f"lvm (layer 6){suffix}", "method": "linear", "fraction": f, "acc_mean": a, "runs": 1}
                for suffix, accs in (("", plain), (" + pixels", joint)) for f, a in accs]
        (tmp_path / name).write_text(json.dumps({"rows": rows + list(extra)}))
        return str(tmp_path / name)

    baseline = [{"features": "raw pixels", "method": "linear", "fraction": 1.0, "acc_mean": 0.845, "runs": 1}]
    main(["--domain", probe("d.json", ((0.1, 0.83), (1.0, 0.87)), ((0.1, 0.85), (1.0, 0.89))),
          "--ood", probe("o.json", ((0.1, 0.80), (1.0, 0.85)), ((0.1, 0.82), (1.0, 0.88)), baseline),
          "--finetune", "", "--out", str(tmp_path / "claim")])
    rows = json.loads((tmp_path / "claim.json").read_text())["rows"]
    d, o = "domain LVM (Fashion-MNIST), linear", "out-of-domain LVM (skimage crops), linear"
    assert rows[d]["accuracy"]["1.0"][0] == 0.87 and rows[d + " + pixels"]["accuracy"]["1.0"][0] == 0.89
    assert rows[d]["block"] == rows[o]["block"] == "domain"
    assert rows[d + " + pixels"]["block"] == rows[o + " + pixels"]["block"] == "domain + pixels"
    # the plain twin (85 %) against the plain domain rows (83 -> 87 %); the pixels twin (88 %) against 85 -> 89 %
    assert rows[o]["domain_matches_at"] == f"{100 * 10 ** (-1 + 2 / 4):.2g} % labels"
    assert rows[o + " + pixels"]["domain_matches_at"] == f"{100 * 10 ** (-1 + 3 / 4):.2g} % labels"
    assert not any("finetun" in name for name in rows)  # --finetune '': no fine-tuning rows
