from lmstack.data.decontaminate import build_eval_index, decontaminate
from lmstack.data.extract import Document

QUESTION = (
    "What is the boiling point of water at sea level in degrees Celsius under standard pressure conditions"
)


def test_planted_contaminated_document_dropped(make_prose):
    clean = [Document(make_prose(i), "s", f"clean{i}") for i in range(3)]
    # the benchmark question pasted into a web page, with different case and punctuation
    leaked = Document(
        make_prose(9)
        + "\nQuiz: what IS the boiling-point of water, at sea level in degrees celsius under standard... "
        + make_prose(10),
        "s",
        "leak",
    )
    index = build_eval_index([QUESTION], n=13)
    kept, removed = decontaminate(clean + [leaked], index)
    assert kept == clean and removed == 1


def test_twelve_shared_words_are_not_contamination(make_prose):
    twelve = " ".join(QUESTION.split()[:12])
    doc = Document(make_prose(1) + " " + twelve + " " + make_prose(2), "s", "d")
    kept, removed = decontaminate([doc], build_eval_index([QUESTION], n=13))
    assert removed == 0 and kept == [doc]


def test_short_eval_items_match_whole(make_prose):
    index = build_eval_index(["Name the largest ocean on the planet today"], n=13)  # 8 words < 13
    doc = Document(make_prose(1) + " name the largest ocean on the planet today " + make_prose(2), "s", "d")
    assert decontaminate([doc], index)[1] == 1


def test_very_short_eval_items_are_ignored(make_prose):
    # a one-word answer such as "Yes" must not remove every document that says yes
    index = build_eval_index(["Yes", "Paris"], n=13)
    docs = [Document(make_prose(i) + " yes, Paris. ", "s", f"d{i}") for i in range(3)]
    assert decontaminate(docs, index) == (docs, 0)


def test_no_eval_sets_keeps_everything(make_prose):
    docs = [Document(make_prose(1), "s", "d")]
    assert decontaminate(docs, build_eval_index([])) == (docs, 0)
