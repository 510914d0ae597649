"""The evaluate stage's table logic: ranking, the label-robust score per row, flat DVC metrics."""

from __future__ import annotations

import json
import math

from tasks.evaluate import add_scores, flat_metrics, markdown, rows_from_cells


def _cell(method: str, accs: list[float], ipc: int = 10, protocol: str = "dd") -> dict:
    return {"method": method, "ipc": ipc, "shots": ipc, "protocol": protocol,
            "label_type": "soft" if protocol == "soft" else "hard", "n_train": 100,
            "runs": [{"seed": i, "test_acc": a, "val_acc": a, "per_class": []} for i, a in enumerate(accs)]}


def _rows() -> list[dict]:
    cells = [_cell("random", [0.5, 0.5]), _cell("dsv_nshot", [0.6, 0.7]), _cell("herding", [0.7, 0.6]),
             _cell("dm", [0.4, 0.45]), _cell("random", [0.3, 0.3], ipc=1), _cell("dsv_nshot", [0.35, 0.25], ipc=1),
             {**_cell("dsv_noise", []), "note": "empty training set"}]
    return add_scores(rows_from_cells(cells), teacher_acc=0.9)


def test_rows_are_ranked_within_each_ipc_with_ties_shared() -> None:
    rows = {(r["method"], r["ipc"]): r for r in _rows()}
    assert rows[("dsv_nshot", 10)]["rank"] == rows[("herding", 10)]["rank"] == 1  # 0.65 both
    assert rows[("dsv_nshot", 10)]["best"] and rows[("herding", 10)]["best"]
    assert rows[("random", 10)]["rank"] == 3 and rows[("dm", 10)]["rank"] == 4
    assert rows[("random", 1)]["rank"] == 1 and rows[("dsv_nshot", 1)]["rank"] == 1
    assert rows[("dsv_noise", 10)]["rank"] is None and rows[("dsv_noise", 10)]["lrs_mean"] is None


def test_label_robust_score_uses_the_random_row_of_the_same_ipc() -> None:
    rows = {(r["method"], r["ipc"]): r for r in _rows()}
    r = rows[("dsv_nshot", 10)]
    lrs = [(math.exp(a) - math.exp(-1)) / (math.exp(1) - math.exp(-1)) for a in (-0.1, 0.0)]  # see test_protocols
    assert math.isclose(r["lrs_mean"], sum(lrs) / 2, rel_tol=1e-9) and r["lrs_reference"] == "teacher"
    assert math.isclose(rows[("random", 10)]["ior_mean"], 0.0)
    assert math.isclose(rows[("dsv_nshot", 1)]["ior_mean"], 0.0) and math.isclose(rows[("dsv_nshot", 1)]["hlr_mean"], 0.6)


def test_full_row_is_the_real_data_reference_when_present() -> None:
    cells = [_cell("random", [0.5]), _cell("dsv_nshot", [0.6]), {**_cell("full", [0.8]), "ipc": 500}]
    rows = add_scores(rows_from_cells(cells), teacher_acc=0.9)
    nshot = next(r for r in rows if r["method"] == "dsv_nshot")
    assert nshot["lrs_reference"] == "full" and math.isclose(nshot["hlr_mean"], 0.2)
    assert next(r for r in rows if r["method"] == "full")["rank"] is None


def test_flat_metrics_hold_scalars_only() -> None:
    m = flat_metrics(0.9, _rows())
    assert m["teacher_acc"] == 0.9 and math.isclose(m["acc"]["dsv_nshot_ipc10"], 0.65)
    assert set(m) == {"teacher_acc", "acc", "acc_std", "lrs"} and "dsv_noise_ipc10" not in m["acc"]
    for section in ("acc", "acc_std", "lrs"):
        assert all(isinstance(v, float) for v in m[section].values())
    assert "seconds" not in json.dumps(m) and "wall" not in json.dumps(m)


def test_markdown_marks_the_best_and_orders_by_rank() -> None:
    text = markdown(0.9, _rows())
    lines = [ln for ln in text.splitlines() if ln.startswith("| ") and "| 10 |" in ln]
    assert [ln.split("|")[2].strip() for ln in lines][:4] == ["dsv_nshot", "herding", "random", "dm"]
    assert "**65.00 ± 5.00**" in lines[0] and "**" not in lines[2]


def test_headline_metrics_are_every_methods_accuracy_in_percent() -> None:
    from tasks.evaluate import headline_metrics

    m = headline_metrics(0.9, _rows())
    assert m == {"random_ipc10": 50.0, "dsv_nshot_ipc10": 65.0, "herding_ipc10": 65.0, "dm_ipc10": 42.5,
                 "random_ipc1": 30.0, "dsv_nshot_ipc1": 30.0, "teacher": 90.0}  # no row without runs
