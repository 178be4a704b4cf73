import json
from collections import Counter

import pytest

from robustunlearn.data.base import QA, Benchmark, MultipleChoice, Passage
from robustunlearn.data.splits import PARTS, part_sizes, relearn_split, retain_views, split_by_subject
from robustunlearn.data.synthetic import SyntheticConfig, generate_synthetic

ATTRIBUTES = ("city", "job", "pet", "school")


def _qas(people, attributes=ATTRIBUTES):
    return [QA(f"{a} of {p}?", f"{p}-{a}", p, a) for p in people for a in attributes]


def _people(prefix, count):
    return [f"{prefix}{i:02d}" for i in range(count)]


def _people_benchmark(retain_people=10):
    people = _people("r", retain_people)
    return Benchmark(
        "people",
        "1",
        {
            "forget_qa": _qas(_people("f", 3)),
            "retain_qa": _qas(people, ATTRIBUTES[:2]),
            "retain_text": [Passage(f"About {p}.", p) for p in reversed(people)],
            "holdout_qa": _qas(_people("h", 2)),
            "utility_text": [Passage("The sea is wide.", "sea")],
        },
        {"seed": 0},
    )


def _muse_benchmark():
    return Benchmark(
        "muse-news",
        "1",
        {
            "forget_text": [Passage(f"forget {i}", "forget") for i in range(3)],
            "forget_qa": [QA(f"fq{i}", f"fa{i}") for i in range(4)],
            "retain_text": [Passage(f"r1 {i}", "retain1") for i in range(5)]
            + [Passage(f"r2 {i}", "retain2") for i in range(4)],
            "retain_qa": [QA(f"rq{i}", f"ra{i}") for i in range(8)],
        },
        {"corpus": "news"},
    )


def test_with_splits_replaces_adds_and_shares_the_rest():
    benchmark = _people_benchmark()
    passage = Passage("new", "x")
    changed = benchmark.with_splits(retain_text=[passage], holdout_text=(passage,))
    assert changed.splits["retain_text"] == [passage] and changed.splits["holdout_text"] == [passage]
    assert changed.splits["forget_qa"] is benchmark.splits["forget_qa"]
    assert changed.metadata == benchmark.metadata and changed.metadata is not benchmark.metadata
    assert len(benchmark.splits["retain_text"]) == 10 and "holdout_text" not in benchmark.splits
    with pytest.raises(TypeError, match="retain_qa"):
        benchmark.with_splits(retain_qa=[passage])
    with pytest.raises(ValueError, match="bad split name"):
        benchmark.with_splits(retained_qa=[])


@pytest.mark.parametrize(
    ("groups", "shares", "sizes"),
    [
        (10, (0.5, 0.25, 0.25), [5, 3, 2]),  # quotas 5, 2.5, 2.5: the tie goes to the earlier part
        (7, (0.5, 0.25, 0.25), [3, 2, 2]),  # quotas 3.5, 1.75, 1.75: the two left go to the .75 remainders
        (3, (0.9, 0.05, 0.05), [1, 1, 1]),  # quotas 2.7, .15, .15 -> 3/0/0, then one each taken from the first
        (4, (0.5, 0.0, 0.5), [2, 0, 2]),
    ],
)
def test_part_sizes_largest_remainder(groups, shares, sizes):
    assert part_sizes(groups, shares) == sizes


@pytest.mark.parametrize(
    ("groups", "shares", "message"),
    [
        (2, (0.5, 0.25, 0.25), "2 subject group"),
        (5, (0.5, 0.6, -0.1), "non-negative"),
        (5, (0.5, 0.4), "sum to 1"),
        (5, (), "sum to 1"),
    ],
)
def test_part_sizes_errors(groups, shares, message):
    with pytest.raises(ValueError, match=message):
        part_sizes(groups, shares)


def test_split_by_subject_keeps_subjects_whole_and_order():
    records = _qas(_people("p", 10))
    parts = split_by_subject(records, (0.5, 0.25, 0.25), seed=3)
    assert sorted(map(id, sum(parts, []))) == sorted(map(id, records))  # disjoint and covering
    subjects = [{r.subject for r in part} for part in parts]
    assert [len(s) for s in subjects] == [5, 3, 2]
    assert not (subjects[0] & subjects[1] or subjects[0] & subjects[2] or subjects[1] & subjects[2])
    for part in parts:
        assert [records.index(r) for r in part] == sorted(records.index(r) for r in part)
    assert split_by_subject(records, (0.5, 0.25, 0.25), seed=3) == parts
    assert split_by_subject(records, (0.5, 0.25, 0.25), seed=4) != parts


def test_split_by_subject_subjectless_records_are_their_own_groups():
    records = [QA(f"q{i}", f"a{i}") for i in range(4)] + _qas(["p"])
    parts = split_by_subject(records, (0.6, 0.4), seed=0)
    assert Counter(len({r.subject or r.question for r in part}) for part in parts) == Counter([3, 2])
    assert any(all(r in part for r in records[4:]) for part in parts)


def test_retain_views_one_assignment_across_retain_splits():
    benchmark = _people_benchmark()
    views = retain_views(benchmark, seed=1)
    retain_splits = ("retain_qa", "retain_text")
    by_view = [
        {name: view.splits[name] for name in retain_splits}
        for view in (views.training, views.validation, views.evaluation)
    ]
    for name in retain_splits:
        records = benchmark.splits[name]
        assert sorted(map(id, (r for view in by_view for r in view[name]))) == sorted(map(id, records))
    subjects = [{r.subject for name in retain_splits for r in view[name]} for view in by_view]
    assert [len(s) for s in subjects] == [5, 3, 2]
    for view, people in zip(by_view, subjects):  # each person's QA and passage in the same view
        assert {r.subject for r in view["retain_qa"]} == {r.subject for r in view["retain_text"]} == people
    for view in (views.training, views.validation, views.evaluation):
        for name in ("forget_qa", "holdout_qa", "utility_text"):
            assert view.splits[name] is benchmark.splits[name]
    description = json.loads(json.dumps(views.description))
    assert description["subjects"] == {part: sorted(people) for part, people in zip(PARTS, subjects)}
    assert description["records"]["validation"] == {"retain_qa": 6, "retain_text": 3}
    assert description["shares"] == {"regulariser": 0.5, "validation": 0.25, "evaluation": 0.25}
    assert retain_views(benchmark, seed=1).description == views.description
    assert retain_views(benchmark, seed=2).description["subjects"] != views.description["subjects"]


def test_retain_views_errors():
    no_retain = Benchmark("only-forget", "1", {"forget_qa": _qas(["a"])})
    with pytest.raises(ValueError, match="'only-forget' has no retain split"):
        retain_views(no_retain, seed=0)
    with pytest.raises(ValueError, match="2 subject group"):
        retain_views(_people_benchmark(retain_people=2), seed=0)
    with pytest.raises(ValueError, match="positive shares"):
        retain_views(_people_benchmark(), seed=0, shares=(1.0, 0.0, 0.0))


def test_retain_views_muse_protocol():
    benchmark = _muse_benchmark()
    views = retain_views(benchmark, seed=0)
    retain1 = [p for p in benchmark.splits["retain_text"] if p.subject == "retain1"]
    assert views.training.splits["retain_text"] == retain1 and views.training.splits["retain_qa"] == []
    held = [views.validation, views.evaluation]
    # retain_qa (about retain2) and the retain2 passages: 12 records, one group each, halved
    assert [len(v.splits["retain_qa"]) + len(v.splits["retain_text"]) for v in held] == [6, 6]
    for name in ("retain_qa", "retain_text"):
        ids = [id(r) for view in held for r in view.splits[name]]
        expected = [r for r in benchmark.splits[name] if getattr(r, "subject", "") != "retain1"]
        assert sorted(ids) == sorted(map(id, expected))
    assert all(p.subject == "retain2" for v in held for p in v.splits["retain_text"])
    assert views.description["subjects"]["regulariser"] == ["retain1"]
    assert "MUSE" in views.description["protocol"]
    assert views.evaluation.splits["forget_qa"] is benchmark.splits["forget_qa"]
    with pytest.raises(ValueError, match="no retain1 passages"):
        retain_views(benchmark.with_splits(retain_text=benchmark.splits["retain_text"][5:]), seed=0)


def test_retain_views_wmdp_splits_the_corpus_by_passage():
    passages = [Passage(f"paper {i}", "bio") for i in range(8)]
    benchmark = Benchmark(
        "wmdp", "1", {"forget_mcq": [MultipleChoice("q", ("a", "b"), 0, "bio")], "retain_text": passages}
    )
    views = retain_views(benchmark, seed=0)
    assert [len(v.splits["retain_text"]) for v in (views.training, views.validation, views.evaluation)] == [4, 2, 2]


def _relearn_benchmark():
    return Benchmark("people", "1", {"forget_qa": _qas(_people("f", 5)), "retain_qa": _qas(["r"])})


def test_relearn_split_subjects_and_attributes():
    benchmark = _relearn_benchmark()
    split = relearn_split(benchmark, subjects=2, attribute_share=0.5, seed=7)
    chosen, attributes = set(split.description["subjects"]), set(split.description["attributes"])
    assert len(chosen) == 2 and len(attributes) == 2
    assert {(r.subject, r.attribute) for r in split.train} == {(s, a) for s in chosen for a in attributes}
    others = set(ATTRIBUTES) - attributes
    assert {(r.subject, r.attribute) for r in split.held_out_attributes} == {(s, a) for s in chosen for a in others}
    assert {r.subject for r in split.held_out_subjects} == {r.subject for r in benchmark.splits["forget_qa"]} - chosen
    assert len(split.held_out_subjects) == 3 * 4
    trained = set(split.train)
    assert not trained & set(split.held_out_subjects) and not trained & set(split.held_out_attributes)
    assert split.description["counts"] == {"train": 4, "held_out_subjects": 12, "held_out_attributes": 4}
    assert split.description["split"] == "forget_qa" and json.dumps(split.description)
    assert relearn_split(benchmark, 2, 0.5, seed=7) == split
    assert relearn_split(benchmark, 2, 0.5, seed=8).description != split.description


def test_relearn_split_attribute_count_is_clamped():
    benchmark = _relearn_benchmark()
    assert len(relearn_split(benchmark, 1, 0.01, seed=0).description["attributes"]) == 1
    assert len(relearn_split(benchmark, 1, 0.99, seed=0).description["attributes"]) == 3


def test_relearn_split_without_attributes_trains_on_whole_subjects():
    records = [QA(f"q{i}", "a", f"s{i % 3}") for i in range(9)]
    split = relearn_split(Benchmark("b", "1", {"forget_qa": records}), subjects=1, attribute_share=0.5, seed=0)
    (subject,) = split.description["subjects"]
    assert split.train == tuple(r for r in records if r.subject == subject)
    assert split.held_out_attributes == () and len(split.held_out_subjects) == 6


@pytest.mark.parametrize(
    ("subjects", "share", "message"),
    [(0, 0.5, "between 1 and 4"), (5, 0.5, "between 1 and 4"), (2, 1.0, "attribute_share")],
)
def test_relearn_split_errors(subjects, share, message):
    with pytest.raises(ValueError, match=message):
        relearn_split(_relearn_benchmark(), subjects, share, seed=0)


def test_relearn_split_text_path():
    passages = [Passage(f"corpus {i}", "bio") for i in range(30)]
    mcq = [MultipleChoice("q", ("a", "b"), 1, "bio")]
    benchmark = Benchmark("wmdp", "1", {"forget_mcq": mcq, "forget_text": passages})
    split = relearn_split(benchmark, subjects=1, attribute_share=0.5, seed=0, text_records=5)
    assert len(split.train) == 5 and set(split.train) <= set(passages)
    assert list(split.train) == sorted(split.train, key=passages.index)
    assert split.held_out_subjects == () == split.held_out_attributes
    assert split.description["split"] == "forget_text" and "forget_mcq" in split.description["note"]
    assert relearn_split(benchmark, 1, 0.5, seed=1, text_records=5).train != split.train
    with pytest.raises(ValueError, match="neither forget_qa nor forget_text"):
        relearn_split(Benchmark("wmdp", "1", {"forget_mcq": mcq}), 1, 0.5, seed=0)


def test_splits_of_a_synthetic_benchmark():
    benchmark = generate_synthetic(SyntheticConfig(num_people=20, num_utility_passages=4, num_utility_qa=2))
    views = retain_views(benchmark, seed=0)
    people = []
    for view in (views.training, views.validation, views.evaluation):
        subjects = {r.subject for r in view.splits["retain_text"]}
        for name in ("retain_qa", "retain_verbmem", "retain_mcq"):
            assert {r.subject for r in view.splits[name]} == subjects  # every kind of a person together
        people += subjects
    assert sorted(people) == sorted(benchmark.metadata["people"]["retain"])
    # 15 people: quotas 7.5, 3.75, 3.75; the two left over go to the .75 remainders
    assert [counts["retain_text"] for counts in views.description["records"].values()] == [7, 4, 4]
    split = relearn_split(benchmark, subjects=1, attribute_share=0.5, seed=0)
    assert split.train and split.held_out_subjects and split.held_out_attributes
