"""Rule-based VQA scores against hand-computed cases: ANLS at its 0.5 threshold, numbers with tolerance, lists,
"Not answerable", exact match, and F1 counted as MMLongBench-Doc counts it."""

import pytest

from megatron_mmpl.eval import metrics

pytestmark = pytest.mark.unit


def test_anls_and_its_threshold():
    assert metrics.levenshtein("kitten", "sitting") == 3
    assert metrics.anls("hello", "hallo") == pytest.approx(0.8)  # 1 edit / 5
    assert metrics.anls("abcde", "abxye") == pytest.approx(0.6)  # 2 / 5
    assert metrics.anls("abcd", "abxy") == 0.0  # similarity exactly 0.5: at the threshold, scored 0
    assert metrics.anls("", "") == 1.0
    # Str goes through clean(): case, quotes, trailing period do not count
    assert metrics.score("Eating out", '"eating out."', "Str") == 1.0
    assert metrics.score("Berlin School", "Berlin Schoo", "Str") == pytest.approx(1 - 1 / 13)


def test_strings_that_need_exact_match():
    assert metrics.score("https://w.wiki/6gb", "https://w.wiki/6gc", "Str") == 0.0  # ANLS would give 0.94
    assert metrics.score("WikidataMapMakingWorkshop.ipynb", "wikidatamapmakingworkshop.ipynb", "Str") == 1.0
    assert metrics.score("2015-2016", "2015-2017", "Str") == 0.0
    assert metrics.score("page 12", "page 13", "Str") == 0.0


def test_numbers():
    assert metrics.score("8", "There are 8 references.", "Int") == 1.0
    assert metrics.score("8", "8.5", "Int") == 0.0
    assert metrics.score("1,234", "1234", "Integer") == 1.0
    assert metrics.score("18.29%", "18.3", "Float") == 1.0  # 0.05 % off: within 1 %
    assert metrics.score("18.29%", "0.1829", "Float") == 1.0  # the same share written as a fraction
    assert metrics.score("18.29%", "19", "Float") == 0.0  # 3.9 % off
    assert metrics.score("21%", "no idea", "Float") == 0.0
    with pytest.raises(ValueError, match="answer_format Int but no number"):
        metrics.score("many", "3", "Int")


def test_lists():
    gt = "['White', '10%']"
    assert metrics.score(gt, "10%, white", "List") == 1.0  # order and case free
    assert metrics.score(gt, "White", "List") == 0.0  # one item short
    assert metrics.score(gt, "['White', '11%']", "List") == 0.0  # 10 % off on the number
    # string items: the worst item's ANLS — circle vs circl = 1 - 1/6
    assert metrics.score(["Circle", "Rectangle"], "Rectangle and Circl", "List") == pytest.approx(5 / 6)
    assert metrics.exact_match(gt, "10%, White", "List") == 1.0
    assert metrics.exact_match(["Circle", "Rectangle"], "Rectangle and Circl", "List") == 0.0


def test_unanswerable():
    assert metrics.score("Not answerable", "Not answerable.", "None") == 1.0
    assert metrics.score("Not answerable", "The question cannot be answered from the document", "None") == 1.0
    assert metrics.score("Not answerable", "42", "None") == 0.0
    assert metrics.score("42", "Not answerable", "Int") == 0.0
    r = metrics.score_record("Not answerable", "Answer: not answerable", "None")
    assert r == {"pred": "not answerable", "score": 1.0, "exact": 1.0, "answerable": False, "pred_answered": False}


def test_extraction_and_formats():
    assert metrics.extract_answer("Answer: 42\nbecause ...") == "42"
    assert metrics.extract_answer("\n\n**Paris**\nmore") == "Paris"
    assert metrics.answer_format("Integer") == "Int" and metrics.answer_format("String") == "Str"
    with pytest.raises(ValueError, match="answer_format 'Number'"):
        metrics.answer_format("Number")
    assert [metrics.infer_format(a) for a in ("1234", "3.5", "10%", "Falcon", "Not answerable")] == \
        ["Int", "Float", "Float", "Str", "None"]
    assert metrics.infer_format("1234, 5678", task="extract_multi") == "List"


def test_f1_counts_not_answerable_as_mmlongbench_doc():
    def rec(score, answerable, answered):
        return {"score": score, "exact": score, "answerable": answerable, "pred_answered": answered}

    records = [rec(1, True, True), rec(1, True, True), rec(0, True, False),  # 3 answerable, one left unanswered
               rec(0, False, True)]  # unanswerable, but the model answered
    s = metrics.summarize(records)
    # accuracy 2/4; recall 2/3 (answerable); precision 2/3 (three answered); F1 = 2/3
    assert s == {"n": 4, "accuracy": 0.5, "exact_match": 0.5, "f1": pytest.approx(2 / 3)}
    records.append(rec(1, False, False))  # a correct "Not answerable": accuracy up, F1 unchanged
    s = metrics.summarize(records)
    assert s["accuracy"] == pytest.approx(3 / 5) and s["f1"] == pytest.approx(2 / 3)
    assert metrics.summarize([])["accuracy"] is None
