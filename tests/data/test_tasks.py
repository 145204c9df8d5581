"""Task-data readers on real files from ../shared/data, and every bad-input error on tiny files."""

import gzip
import json
import random
import unicodedata

import pytest
from conftest import SHARED_DATA

from lmforge.data import (
    QAExample,
    read_chat,
    read_classification,
    read_parallel_text,
    read_squad,
    read_tagged,
    read_text2text,
    split_by_article,
)
from lmforge.utils.errors import UserError

SST2 = SHARED_DATA / "classification" / "sst2"
UCI = SHARED_DATA / "classification" / "uci-sentiment"
WNUT = SHARED_DATA / "ner" / "wnut17"
UNER = SHARED_DATA / "ner" / "uner-en-ewt"
SQUAD = SHARED_DATA / "qa" / "squad-v1.1-dev" / "dev-v1.1.json"
XQUAD = SHARED_DATA / "qa" / "xquad"
SCITLDR = SHARED_DATA / "summarization" / "scitldr"
MULTI30K = SHARED_DATA / "translation" / "multi30k-en-de"

pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present")


def user_error(fn, *args, names=(), **kwargs) -> str:
    """Call fn, expect a one-line UserError that contains every string in `names`; return it."""
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    for name in names:
        assert str(name) in message, (name, message)
    return message


def write(path, text: str):
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# --- classification ---------------------------------------------------------------------------


def test_sst2_with_header_and_unlabelled_test():
    dev = read_classification(SST2 / "dev.tsv", labels=["0", "1"])
    raw = (SST2 / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
    assert len(dev) == len(raw) == 872  # SOURCE.txt: 872 labelled rows
    assert [(e.text, e.label) for e in dev[:50]] == [(r.split("\t")[0].strip(), r.split("\t")[1]) for r in raw[:50]]
    assert dev[0].where == f"{SST2 / 'dev.tsv'}:2"
    # test.tsv is "index\tsentence": unlabelled, which is an error unless asked for.
    user_error(read_classification, SST2 / "test.tsv", names=[f"{SST2 / 'test.tsv'}:1", "label", "require_labels", "--label-field NAME", "lmforge predict"])
    test = read_classification(SST2 / "test.tsv", require_labels=False)
    assert len(test) == 1821 and all(e.label is None for e in test)
    assert test[0].text == "uneasy mishmash of styles and genres ."


def test_uci_headerless_and_label_set():
    yelp = read_classification(UCI / "yelp_labelled.txt", labels=["0", "1"])
    assert len(yelp) == 1000 and {e.label for e in yelp} == {"0", "1"}
    assert (yelp[0].text, yelp[0].label, yelp[0].where) == ("Wow... Loved this place.", "1", f"{UCI / 'yelp_labelled.txt'}:1")
    assert sum(e.label == "1" for e in yelp) == 500  # the UCI sets are balanced
    user_error(read_classification, UCI / "yelp_labelled.txt", labels=["pos", "neg"], names=[f"{UCI / 'yelp_labelled.txt'}:1", "'1'"])


def test_gzip_csv_and_jsonl_agree(tmp_path):
    lines = (SST2 / "dev.tsv").read_text(encoding="utf-8").splitlines()[:21]
    plain = read_classification(write(tmp_path / "dev.tsv", "\n".join(lines) + "\n"))
    zipped = read_classification(write(tmp_path / "dev.tsv.gz", "\n".join(lines) + "\n"))
    assert [(e.text, e.label) for e in zipped] == [(e.text, e.label) for e in plain] and len(plain) == 20
    records = [{"review": e.text, "stars": int(e.label)} for e in plain]
    jsonl = write(tmp_path / "d.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    from_jsonl = read_classification(jsonl, text_field="review", label_field="stars")
    assert [(e.text, e.label) for e in from_jsonl] == [(e.text, e.label) for e in plain]  # ints read as "0"/"1"
    csv_text = 'label,text\n1,"great, really ""great"""\n0,"two\nlines"\n'
    from_csv = read_classification(write(tmp_path / "d.csv", csv_text))
    assert [(e.text, e.label, e.where[-2:]) for e in from_csv] == [('great, really "great"', "1", ":2"), ("two\nlines", "0", ":3")]


def test_classification_errors(tmp_path):
    empty = write(tmp_path / "empty.tsv", "\n\n")
    user_error(read_classification, empty, names=[empty, "empty"])
    header_only = write(tmp_path / "h.tsv", "sentence\tlabel\n")
    user_error(read_classification, header_only, names=[header_only, "no examples"])
    three = write(tmp_path / "three.txt", "good\t1\nbad\t0\textra\n")
    user_error(read_classification, three, names=[f"{three}:2", "3 tab-separated fields"])
    ragged = write(tmp_path / "ragged.tsv", "sentence\tlabel\ngood\t1\nbad\n")
    user_error(read_classification, ragged, names=[f"{ragged}:3", "header has 2"])
    no_label = write(tmp_path / "n.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n')
    user_error(read_classification, no_label, names=[f"{no_label}:2", "label"])
    no_text = write(tmp_path / "t.jsonl", '{"body": "a", "label": 1}\n')
    user_error(read_classification, no_text, names=[f"{no_text}:1", "text_field"])
    bad_json = write(tmp_path / "b.jsonl", '{"text": "a", "label": 1}\n{"text": "b", \n')
    user_error(read_classification, bad_json, names=[f"{bad_json}:2", "invalid JSON"])
    bad_label = write(tmp_path / "l.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": 7}\n')
    user_error(read_classification, bad_label, labels=[0, 1], names=[f"{bad_label}:2", "'7'"])
    null_label = write(tmp_path / "null.jsonl", '{"text": "a", "label": null}\n')
    user_error(read_classification, null_label, names=[f"{null_label}:1", "label"])
    empty_text = write(tmp_path / "e.tsv", "sentence\tlabel\n \t1\n")
    user_error(read_classification, empty_text, names=[f"{empty_text}:2", "empty"])
    headerless = write(tmp_path / "x.txt", "good\t1\n")
    user_error(read_classification, headerless, text_field="review", names=[f"{headerless}:1", "header"])
    no_text_csv = write(tmp_path / "n.csv", "\nbody,label\na,1\n")
    user_error(read_classification, no_text_csv, names=[f"{no_text_csv}:2", "columns: body, label"])  # the header line
    ragged_csv = write(tmp_path / "r.csv", "text,label\na,1\nb,0,9\n")
    user_error(read_classification, ragged_csv, names=[f"{ragged_csv}:3", "header has 2"])
    user_error(read_classification, tmp_path / "missing.tsv", names=["missing.tsv", "does not exist"])
    not_gzip = tmp_path / "fake.tsv.gz"
    not_gzip.write_bytes(b"sentence\tlabel\n")
    user_error(read_classification, not_gzip, names=[not_gzip, "gzip"])
    # A CoNLL tagging file is word<TAB>tag lines: two columns, as a headerless classification file has.
    user_error(read_classification, WNUT / "wnut17train.conll", names=[WNUT / "wnut17train.conll", "IOB2", "--task tag"])
    tags_as_labels = write(tmp_path / "o.tsv", "a fine day\tO\nwell\tB-x\n")  # texts with spaces: a label set that happens to look like tags
    assert [e.label for e in read_classification(tags_as_labels)] == ["O", "B-x"]


def test_a_headerless_tsv_whose_first_line_is_a_header_of_other_names_is_refused(tmp_path):
    numbers = write(tmp_path / "h.tsv", "review\tsentiment\ngreat film\t1\nbad film\t0\n")
    user_error(read_classification, numbers, names=[f"{numbers}:1", "header", "--text-field review --label-field sentiment"])
    named = read_classification(numbers, text_field="review", label_field="sentiment")
    assert [(e.text, e.label, e.where) for e in named] == [("great film", "1", f"{numbers}:2"), ("bad film", "0", f"{numbers}:3")]
    spaced = write(tmp_path / "s.tsv", "review text\tsentiment\ngreat film\t1\n")
    user_error(read_classification, spaced, names=["--text-field 'review text' --label-field sentiment"])  # pastes as is
    assert read_classification(spaced, labels=["sentiment", "0", "1"])[0].label == "sentiment"  # a known label: an example
    # Less than sure, read as an example: word labels (a 3-class file whose first example's class is rare, an
    # intent), a number as the first label, a sentence's label.
    for text in ("Meh\tneutral\ngood\tpositive\nfine\tpositive\nbad\tnegative\nawful\tnegative\n",
                 "hello\tgreeting\nbye\tfarewell\nsee you\tfarewell\n", "Excellent!\t4\nok\t3\nbad\t1\n",
                 "a fine day\tO\nwell\tB-x\n"):
        first = read_classification(write(tmp_path / "e.tsv", text))[0]
        assert (first.text, first.where) == (text.split("\t")[0], f"{tmp_path / 'e.tsv'}:1")


def test_unlabelled_data_may_leave_its_label_empty_or_null(tmp_path):
    files = {
        "t.tsv": "sentence\tlabel\nhello there\t\n",
        "c.csv": "text,label\nhello there,\n",
        "j.jsonl": '{"text": "hello there", "label": null}\n',
    }
    for name, text in files.items():
        path = write(tmp_path / name, text)
        user_error(read_classification, path, names=[f"{path}:2" if name != "j.jsonl" else f"{path}:1", "label"])
        assert [(e.text, e.label) for e in read_classification(path, require_labels=False)] == [("hello there", None)]


def test_a_csv_field_may_be_longer_than_the_csv_modules_default_limit(tmp_path):
    text = "word " * 40_000  # 200,000 characters, over csv's 131,072
    [example] = read_classification(write(tmp_path / "long.csv", f'text,label\n"{text}",1\n'))
    assert (example.text, example.label) == (text.strip(), "1")


@pytest.mark.parametrize("name", ["a.txt", "a.ndjson", "a.ndjson.gz"])
def test_jsonl_classification_data_is_told_by_its_first_line_whatever_its_name(tmp_path, name):
    path = write(tmp_path / name, '{"text": "hi there", "label": 1}\n\n{"text": "bye", "label": 0}\n')
    assert [(e.text, e.label, e.where) for e in read_classification(path)] == [
        ("hi there", "1", f"{path}:1"), ("bye", "0", f"{path}:3"),
    ]


@pytest.mark.parametrize(
    "reader, text, key",
    [
        (read_classification, '{"text": "hi \\ud83d there", "label": 1}', "text"),
        (read_classification, '{"text": "hi", "label": "\\udc00"}', "label"),
        (read_text2text, '{"source": "a \\udc00 b", "target": "x"}', "source"),
        (read_text2text, '{"source": "a", "target": ["x", "y \\ud83d"]}', "target"),
        (read_chat, '{"messages": [{"role": "user", "content": "a \\udc00"}, {"role": "assistant", "content": "x"}]}', "content"),
    ],
)
def test_a_lone_surrogate_escape_in_json_is_one_line(tmp_path, reader, text, key):
    # "\ud83d" without the low half after it decodes to a str that no tokenizer takes.
    path = write(tmp_path / "s.jsonl", text + "\n")
    for require_labels in (True, False):
        user_error(reader, path, require_labels=require_labels, names=[f"{path}:1: {key!r}", "unpaired surrogate", "\\u"])
    paired = write(tmp_path / "p.jsonl", '{"text": "hi \\ud83d\\ude00", "label": 1}\n')  # a pair is one character
    assert read_classification(paired)[0].text == "hi \U0001f600"


# --- tagging ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, sentences", [("wnut17train.conll", 3394), ("emerging.dev.conll", 1009), ("emerging.test.annotated", 1287)]
)
def test_wnut17(name, sentences):
    examples = read_tagged(WNUT / name)
    lines = (WNUT / name).read_text(encoding="utf-8").split("\n")
    assert len(examples) == sentences  # SOURCE.txt
    # The train file separates sentences with "\t" lines, and '#hashtag\tO' lines are tokens, not comments.
    assert sum(len(e.tokens) for e in examples) == sum(1 for line in lines if line.strip())
    assert any(t.startswith("#") for e in examples for t in e.tokens)
    assert all(len(e.tokens) == len(e.tags) for e in examples)
    if name == "wnut17train.conll":
        first = examples[0]
        assert first.where == f"{WNUT / name}:1" and first.tokens[:3] == ["@paulwalk", "It", "'s"]
        i = first.tokens.index("Empire")
        assert first.tokens[i : i + 3] == ["Empire", "State", "Building"]
        assert first.tags[i : i + 3] == ["B-location", "I-location", "I-location"]
        assert examples[1].where == f"{WNUT / name}:{lines.index(chr(9)) + 2}"


@pytest.mark.parametrize("name", ["en_ewt-ud-dev.iob2", "en_ewt-ud-test.iob2"])
def test_universal_ner_tokens_rebuild_the_text_comments(name):
    examples = read_tagged(UNER / name, labels=["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"])
    texts = [line[len("# text = ") :] for line in (UNER / name).read_text(encoding="utf-8").splitlines() if line.startswith("# text = ")]
    assert len(examples) == len(texts) > 2000
    # Each `# text` comment, spaces removed, is its tokens joined: the token column was found.
    for example, text in zip(examples, texts):
        assert "".join(example.tokens) == unicodedata.normalize("NFC", text).replace(" ", "")
    assert examples[0].where == f"{UNER / name}:4"  # after three comment lines


def test_conll2003_layout_docstart_and_gzip(tmp_path):
    text = "-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\nGerman JJ B-NP B-MISC\n\nPeter NNP B-NP B-PER\n"
    for name in ("c.txt", "c.txt.gz"):
        examples = read_tagged(write(tmp_path / name, text))
        assert [(e.tokens, e.tags, e.where.rsplit(":", 1)[1]) for e in examples] == [
            (["EU", "rejects", "German"], ["B-ORG", "O", "B-MISC"], "3"),
            (["Peter"], ["B-PER"], "7"),
        ]
    # An I- after O is accepted (seqeval starts an entity there).
    assert read_tagged(write(tmp_path / "i.tsv", "a\tO\nb\tI-PER\n"))[0].tags == ["O", "I-PER"]


def test_docstart_lines_are_skipped_whatever_their_columns(tmp_path):
    conll = "-DOCSTART- -X- -X- O\n\nEU B-ORG\nrejects O\n\n-DOCSTART- -X- -X- O\n\nPeter B-PER\n"
    examples = read_tagged(write(tmp_path / "d.conll", conll))
    assert [(e.tokens, e.tags, e.where.rsplit(":", 1)[1]) for e in examples] == [
        (["EU", "rejects"], ["B-ORG", "O"], "3"), (["Peter"], ["B-PER"], "8"),
    ]
    bare = write(tmp_path / "b.conll", "-DOCSTART-\nParis\tB-LOC\n")
    assert [(e.tokens, e.tags) for e in read_tagged(bare)] == [(["Paris"], ["B-LOC"])]
    # Without blank lines around it, a document's start still ends the sentence before it.
    joined = write(tmp_path / "j.conll", "1\tEU\tB-ORG\n2\trejects\tO\n-DOCSTART-\n1\tPeter\tB-PER\n")
    assert [e.tokens for e in read_tagged(joined)] == [["EU", "rejects"], ["Peter"]]


@pytest.mark.parametrize("sep", ["\t", " "])
def test_an_index_column_is_told_by_counting_the_words_of_every_sentence(tmp_path, sep):
    three = write(tmp_path / "i.iob2", "1 Paris B-LOC\n2 is O\n\n1 London B-LOC\n".replace(" ", sep))
    assert [(e.tokens, e.tags) for e in read_tagged(three)] == [(["Paris", "is"], ["B-LOC", "O"]), (["London"], ["B-LOC"])]
    four = write(tmp_path / "p.iob2", "# a comment\n" + "1 Paris NNP B-LOC\n2 is VBZ O\n".replace(" ", sep))
    assert [(e.tokens, e.tags) for e in read_tagged(four)] == [(["Paris", "is"], ["B-LOC", "O"])]
    # Numbers that are words: the first column stops counting, so it holds the tokens.
    numbers = write(tmp_path / "n.conll", "1 CD O\n2 CD O\n\nEU NNP B-ORG\n".replace(" ", sep))
    assert [e.tokens for e in read_tagged(numbers)] == [["1", "2"], ["EU"]]
    # An index that breaks off (a gap, a line short of a column) is named, not read as the words.
    gap = write(tmp_path / "g.iob2", "1 Paris B-LOC\n2 is O\n\n1 I O\n2 love O\n4 Berlin B-LOC\n".replace(" ", sep))
    user_error(read_tagged, gap, names=[f"{gap}:6", "the index column says '4' for word 3"])
    short = write(tmp_path / "s.iob2", "1 Paris B-LOC x -\n2 is O x\n".replace(" ", sep))
    user_error(read_tagged, short, names=[f"{short}:2", "4 columns but line 1 has 5"])


def test_tagged_errors(tmp_path):
    empty = write(tmp_path / "e.conll", "\n\t\n")
    user_error(read_tagged, empty, names=[empty, "no examples"])
    ragged = write(tmp_path / "r.conll", "a\tO\nb\tO\n\nc\tO\tX\n")
    user_error(read_tagged, ragged, names=[f"{ragged}:4", "3 columns", "line 1 has 2"])
    not_iob2 = write(tmp_path / "n.conll", "a\tO\nb\tS-PER\n")
    user_error(read_tagged, not_iob2, names=[f"{not_iob2}:2", "'S-PER'", "IOB2"])
    no_type = write(tmp_path / "t.conll", "a\tB-\n")
    user_error(read_tagged, no_type, names=[f"{no_type}:1", "IOB2"])
    unknown = write(tmp_path / "u.conll", "a\tB-PER\n\nb\tB-LOC\n")
    user_error(read_tagged, unknown, labels=["O", "B-PER", "I-PER"], names=[f"{unknown}:3", "'B-LOC'"])
    no_token = write(tmp_path / "k.conll", "a\tO\n \tO\n")
    user_error(read_tagged, no_token, names=[f"{no_token}:2", "token is empty"])
    tokens_only = write(tmp_path / "p.conll", "Peter\nlives\n\nin\nBerlin\n")
    user_error(read_tagged, tokens_only, names=[f"{tokens_only}:1", "no tag column", "predict"])


def test_tokens_only_files_are_read_without_labels(tmp_path):
    tokens_only = write(tmp_path / "p.conll", "-DOCSTART-\n\nPeter\nlives\n\nin\nBerlin\n")
    assert [(e.tokens, e.tags, e.where) for e in read_tagged(tokens_only, require_labels=False)] == [
        (["Peter", "lives"], None, f"{tokens_only}:3"), (["in", "Berlin"], None, f"{tokens_only}:6"),
    ]
    labelled = write(tmp_path / "l.conll", "Peter\tB-PER\n")  # tags present are still read (and checked)
    assert read_tagged(labelled, require_labels=False)[0].tags == ["B-PER"]


def test_hash_lines_are_comments_only_where_the_file_writes_comments(tmp_path):
    # Whitespace-separated: `#FollowFriday O` is a token line, even as the file's first line.
    spaced = write(tmp_path / "s.conll", "#FollowFriday O\nto O\nParis B-LOC\n\n# O\nhi O\n")
    assert [(e.tokens, e.tags, e.where) for e in read_tagged(spaced)] == [
        (["#FollowFriday", "to", "Paris"], ["O", "O", "B-LOC"], f"{spaced}:1"), (["#", "hi"], ["O", "O"], f"{spaced}:5"),
    ]
    # A `#` line that does not fit the token columns (no tag where the tag goes) is a comment.
    commented = write(tmp_path / "c.conll", "# sent_id = 1\n# text = to Paris\nto O\nParis B-LOC\n")
    assert [(e.tokens, e.where) for e in read_tagged(commented)] == [(["to", "Paris"], f"{commented}:3")]
    # Tokens only: `#hashtag` is a token, `# a comment` is not.
    tokens_only = write(tmp_path / "t.conll", "# a comment\n#FollowFriday\nParis\n")
    assert read_tagged(tokens_only, require_labels=False)[0].tokens == ["#FollowFriday", "Paris"]
    # Tab-separated (UNER, WNUT): a `#` line without a tab is a comment, `#hashtag<TAB>O` a token.
    tabbed = write(tmp_path / "u.iob2", "# text = #tag\n#tag\tO\n")
    assert [(e.tokens, e.where) for e in read_tagged(tabbed)] == [(["#tag"], f"{tabbed}:2")]


def test_wnut17_with_spaces_for_tabs_reads_as_the_tab_separated_file(tmp_path):
    text = (WNUT / "wnut17train.conll").read_text(encoding="utf-8")
    sentences = text.split("\n\t\n")[:300]
    first_hash = next(i for i, s in enumerate(sentences) if s.startswith("#"))  # a sentence that starts with a hashtag
    chosen = sentences[first_hash : first_hash + 40]
    tabbed = write(tmp_path / "tab.conll", "\n\n".join(chosen) + "\n")
    spaced = write(tmp_path / "space.conll", tabbed.read_text(encoding="utf-8").replace("\t", " "))
    expected = [(e.tokens, e.tags) for e in read_tagged(tabbed)]
    assert expected[0][0][0].startswith("#") and len(expected) == 40
    assert [(e.tokens, e.tags) for e in read_tagged(spaced)] == expected


# --- extractive QA ------------------------------------------------------------------------------


def test_squad_dev_and_xquad():
    examples = read_squad(SQUAD)
    assert len(examples) == 10570 and len({e.title for e in examples}) == 48  # SOURCE.txt
    first = examples[0]
    assert first.id == "56be4db0acb8001400a502ec" and first.title == "Super_Bowl_50"
    assert first.answers == [("Denver Broncos", 177)] * 3
    assert first.where == f"{SQUAD}: question 56be4db0acb8001400a502ec"
    assert all(e.context[s : s + len(t)] == t for e in examples for t, s in e.answers)
    english = read_squad(XQUAD / "xquad.en.json")
    german = read_squad(XQUAD / "xquad.de.json")
    assert len(english) == len(german) == 1190 and {e.id for e in english} <= {e.id for e in examples}
    assert [e.id for e in german] == [e.id for e in english]


def test_split_by_article():
    examples = read_squad(XQUAD / "xquad.en.json")
    first, second = split_by_article(examples, fraction=0.8, seed=0)
    titles1, titles2 = {e.title for e in first}, {e.title for e in second}
    assert not titles1 & titles2 and len(first) + len(second) == len(examples)
    assert len(titles1) == round(0.8 * 48)
    assert [e.id for e in first] == [e.id for e in examples if e.title in titles1]  # input order kept
    shuffled = list(examples)
    random.Random(1).shuffle(shuffled)
    assert {e.title for e in split_by_article(shuffled, 0.8, seed=0)[0]} == titles1
    assert {e.title for e in split_by_article(examples, 0.8, seed=1)[0]} != titles1
    user_error(split_by_article, examples, fraction=1.0, names=["fraction"])
    user_error(split_by_article, examples[:1], names=["article"])



@pytest.mark.parametrize("n_articles,fraction,n_first", [(7, 0.8, 6), (7, 0.3, 2), (2, 0.9, 1), (5, 0.05, 1)])
def test_split_by_article_rounds_the_share_of_articles(n_articles, fraction, n_first):
    """fraction x articles is rounded to the nearest (0.8 x 7 = 5.6 -> 6, 0.3 x 7 = 2.1 -> 2), and each side keeps
    at least one article."""
    examples = [QAExample(f"q{i}", f"article {i % n_articles}", "c", "q", [], "w") for i in range(3 * n_articles)]
    first, second = split_by_article(examples, fraction=fraction, seed=0)
    assert len({e.title for e in first}) == n_first and len({e.title for e in second}) == n_articles - n_first


def squad_json(answer_start=12, qid="q1", answers=None, extra_qas=(), indent=None):
    context = "The cat sat on the mat."
    answers = [{"text": "on the mat", "answer_start": answer_start}] if answers is None else answers
    qas = [{"id": qid, "question": "Where?", "answers": answers}, *extra_qas]
    return json.dumps({"version": "1.1", "data": [{"title": "Cats", "paragraphs": [{"context": context, "qas": qas}]}]}, indent=indent)


def id_line(path, qid, nth=0) -> int:
    """The line of the nth `"id": "QID"` in a JSON file, counted independently of the reader."""
    return [i for i, line in enumerate(path.read_text().splitlines(), 1) if f'"id": "{qid}"' in line][nth]


def test_squad_questions_without_answers_are_read_for_predicting(tmp_path):
    no_answers = {"id": "q2", "question": "Who?"}  # no "answers" key at all
    path = write(tmp_path / "unlabelled.json", squad_json(answers=[], extra_qas=[no_answers]))
    user_error(read_squad, path, names=[f"{path}:1: question q1", "no answers"])
    no_key = write(tmp_path / "no-key.json", squad_json(extra_qas=[no_answers], indent=1))
    user_error(read_squad, no_key, names=[f"{no_key}:{id_line(no_key, 'q2')}: question q2", "missing 'answers'"])
    first, second = read_squad(path, require_labels=False)
    assert (first.id, first.answers, second.id, second.answers) == ("q1", [], "q2", [])
    moved = write(tmp_path / "moved.json", squad_json(answer_start=13))
    user_error(read_squad, moved, require_labels=False, names=["answer_start 13"])  # answers given are still checked


def test_squad_gzip_and_errors(tmp_path):
    good = read_squad(write(tmp_path / "ok.json.gz", squad_json()))
    assert good[0].answers == [("on the mat", 12)] and good[0].title == "Cats"
    moved = write(tmp_path / "moved.json", squad_json(answer_start=13, indent=1))
    line = id_line(moved, "q1")
    assert line > 1
    message = user_error(read_squad, moved, names=[f"{moved}:{line}: question q1", "offset 12", "answer_start 13", "fix answer_start"])
    assert "does not occur" not in message
    absent = write(tmp_path / "absent.json", squad_json(answers=[{"text": "on the rug", "answer_start": 12}], indent=1))
    user_error(read_squad, absent, names=[f"{absent}:{line}: question q1", "'on the rug'", "does not occur in its context"])
    empty_answer = write(tmp_path / "ea.json", squad_json(answers=[{"text": " ", "answer_start": 3}]))
    user_error(read_squad, empty_answer, names=[f"{empty_answer}:1: question q1", "empty"])
    dup = write(tmp_path / "dup.json", squad_json(extra_qas=[{"id": "q1", "question": "?", "answers": [{"text": "cat", "answer_start": 4}]}], indent=1))
    user_error(read_squad, dup, names=[f"{dup}:{id_line(dup, 'q1', 1)}: question q1", "twice"])  # the second one
    unanswerable = write(tmp_path / "v2.json", squad_json(answers=[], indent=1))
    user_error(read_squad, unanswerable, names=[f"{unanswerable}:{line}: question q1", "no answers"])
    for blank in ("", " \n\n"):
        nothing_at_all = write(tmp_path / "blank.json", blank)
        assert "invalid JSON" not in user_error(read_squad, nothing_at_all, names=[f"{nothing_at_all} is empty"])
    broken = write(tmp_path / "broken.json", '{"data": [\n{"title": }\n]}')
    user_error(read_squad, broken, names=[f"{broken}:2", "invalid JSON"])
    not_squad = write(tmp_path / "other.json", '{"questions": []}')
    user_error(read_squad, not_squad, names=[not_squad, '"data"'])
    no_context = write(tmp_path / "nc.json", '{"data": [{"title": "T", "paragraphs": [{"qas": []}]}]}')
    user_error(read_squad, no_context, names=[no_context, "'context'"])
    nothing = write(tmp_path / "none.json", '{"data": []}')
    user_error(read_squad, nothing, names=[nothing, "no examples"])


@pytest.mark.parametrize(
    "change, complaint",
    [
        (lambda doc: doc["data"][0]["paragraphs"][0]["qas"][0].update(question=None), "question"),
        (lambda doc: doc["data"][0]["paragraphs"][0]["qas"][0].update(question=5), "question"),
        (lambda doc: doc["data"][0]["paragraphs"][0]["qas"][0].update(question=" "), "question"),
        (lambda doc: doc["data"][0]["paragraphs"][0]["qas"][0].update(id=None), "id"),
        (lambda doc: doc["data"][0]["paragraphs"][0]["qas"][0].update(answers={"text": "on the mat", "answer_start": 12}), "answers"),
        (lambda doc: doc["data"][0].update(paragraphs=None), "paragraphs"),
        (lambda doc: doc["data"][0]["paragraphs"][0].update(qas=None), "qas"),
        (lambda doc: doc["data"][0]["paragraphs"][0].update(qas={"id": "q1"}), "qas"),
    ],
)
def test_squad_values_of_the_wrong_kind_are_one_line(tmp_path, change, complaint):
    doc = json.loads(squad_json())
    change(doc)
    path = write(tmp_path / "bad.json", json.dumps(doc, indent=1))
    for require_labels in (True, False):
        user_error(read_squad, path, require_labels=require_labels, names=[path, repr(complaint)])


@pytest.mark.parametrize("key", ["title", "context", "id", "question"])
def test_a_lone_surrogate_escape_in_squad_is_one_line(tmp_path, key):
    doc = json.loads(squad_json())
    article = doc["data"][0]
    paragraph = article["paragraphs"][0]
    owner = {"title": article, "context": paragraph}.get(key, paragraph["qas"][0])
    owner[key] = owner[key][:3] + "\ud83d" + owner[key][3:]  # the context keeps its answer at 12
    path = write(tmp_path / "s.json", json.dumps(doc))
    for require_labels in (True, False):
        user_error(read_squad, path, require_labels=require_labels, names=[path, f"{key!r} holds an unpaired surrogate (\\ud83d)"])


# --- text to text -------------------------------------------------------------------------------


def test_scitldr():
    examples = read_text2text(SCITLDR / "dev.jsonl")
    records = [json.loads(line) for line in (SCITLDR / "dev.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(examples) == len(records) == 619  # SOURCE.txt
    for example, record in zip(examples[:50], records):
        assert example.source == " ".join(s.strip() for s in record["source"])
        assert example.references == [t.strip() for t in record["target"]] and example.target == example.references[0]
    assert max(len(e.references) for e in examples) == 4 and examples[1].where == f"{SCITLDR / 'dev.jsonl'}:2"


def test_text2text_mapping_csv_and_errors(tmp_path):
    jsonl = write(tmp_path / "d.jsonl.gz", '{"document": "long text", "summary": "short"}\n')
    [example] = read_text2text(jsonl, source_field="document", target_field="summary")
    assert (example.source, example.target, example.references) == ("long text", "short", ["short"])
    [example] = read_text2text(write(tmp_path / "d.csv", "input,output\nhello,hallo\n"))
    assert (example.source, example.target) == ("hello", "hallo")
    missing = write(tmp_path / "m.jsonl", '{"source": "a", "target": "b"}\n{"source": "a"}\n')
    user_error(read_text2text, missing, names=[f"{missing}:2", "target"])
    empty_target = write(tmp_path / "t.jsonl", '{"source": "a", "target": ["", " "]}\n')
    user_error(read_text2text, empty_target, names=[f"{empty_target}:1", "empty"])
    wrong_type = write(tmp_path / "w.jsonl", '{"source": 3, "target": "b"}\n')
    user_error(read_text2text, wrong_type, names=[f"{wrong_type}:1", "string"])
    user_error(read_text2text, write(tmp_path / "e.jsonl", ""), names=["e.jsonl"])


def test_text2text_errors_name_the_real_options(tmp_path):
    no_target = write(tmp_path / "m.jsonl", '{"source": "a"}\n')
    user_error(read_text2text, no_target, names=[f"{no_target}:1", "--label-field NAME", "lmforge predict"])
    assert "--target-field" not in user_error(read_text2text, no_target, target_field="summary", names=["'summary'"])
    no_source = write(tmp_path / "s.jsonl", '{"body": "a", "target": "b"}\n')
    message = user_error(read_text2text, no_source, names=[f"{no_source}:1", "--text-field NAME"])
    assert "--source-field" not in message


def test_text2text_without_targets_for_predicting(tmp_path):
    jsonl = write(tmp_path / "d.jsonl", '{"source": "a man rides"}\n{"source": ["two", "sentences"], "target": "b"}\n')
    first, second = read_text2text(jsonl, require_labels=False)
    assert (first.source, first.target, first.references, first.where) == ("a man rides", None, [], f"{jsonl}:1")
    assert (second.source, second.target, second.references) == ("two sentences", "b", ["b"])  # targets given are read
    csv_file = write(tmp_path / "d.csv", "input\nhello\n")
    assert [(e.source, e.target) for e in read_text2text(csv_file, require_labels=False)] == [("hello", None)]


@pytest.mark.parametrize("name", ["src.en", "src.txt", "src.en.gz"])
def test_a_plain_text_file_is_one_source_per_line(tmp_path, name):
    path = write(tmp_path / name, "\ufeffA man rides a horse.\n\n{braces} are text too\ncafe\u0301\n")
    examples = read_text2text(path, require_labels=False)
    assert [(e.source, e.target, e.where) for e in examples] == [
        ("A man rides a horse.", None, f"{path}:1"), ("{braces} are text too", None, f"{path}:3"), ("café", None, f"{path}:4"),
    ]
    # Labelled data needs the targets: a clear line naming the options that give them, not "invalid JSON".
    message = user_error(read_text2text, path, names=[path, "--target", "--val-target"])
    assert "invalid JSON" not in message
    # A file that is JSONL by its name or its first line is still JSONL.
    broken = write(tmp_path / "b.jsonl", "not json\n")
    user_error(read_text2text, broken, require_labels=False, names=[f"{broken}:1", "invalid JSON"])
    records = write(tmp_path / "records.txt", '{"source": "x", "target": "y"}\n')
    assert read_text2text(records)[0].target == "y"


def test_parallel_text_multi30k_and_errors(tmp_path):
    examples = read_parallel_text(MULTI30K / "val.en.gz", MULTI30K / "val.de.gz")
    with gzip.open(MULTI30K / "val.de.gz", "rt", encoding="utf-8") as f:
        german = f.read().splitlines()
    assert len(examples) == len(german) == 1014  # SOURCE.txt: val 1,014
    assert examples[0].source == "A group of men are loading cotton onto a truck"
    assert [e.target for e in examples] == [unicodedata.normalize("NFC", g) for g in german]
    assert examples[5].references == [examples[5].target] and examples[5].where == f"{MULTI30K / 'val.en.gz'}:6"
    user_error(
        read_parallel_text, MULTI30K / "val.en.gz", MULTI30K / "test_2016_flickr.de.gz",
        names=["val.en.gz", "test_2016_flickr.de.gz", "1014", "1000"],
    )
    src, tgt = write(tmp_path / "s.en", "a\nb\nc\n"), write(tmp_path / "t.de", "x\n\nz\n")
    user_error(read_parallel_text, src, tgt, names=[f"{tgt}:2", "empty"])
    fake = tmp_path / "t.de.gz"
    fake.write_bytes(b"x\ny\nz\n")
    user_error(read_parallel_text, src, fake, names=[fake, "gzip"])
    user_error(read_parallel_text, src, tmp_path, names=[tmp_path, "is a directory"])
    user_error(read_parallel_text, tmp_path, tgt, names=[tmp_path, "is a directory"])


# --- chat ---------------------------------------------------------------------------------------


def test_chat(tmp_path):
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    path = write(tmp_path / "c.jsonl", json.dumps({"messages": conversation}) + "\n\n" + json.dumps(conversation[1:]) + "\n")
    first, second = read_chat(path)
    assert first.messages == conversation and second.messages == conversation[1:]
    assert (first.where, second.where) == (f"{path}:1", f"{path}:3")


@pytest.mark.parametrize(
    "line, complaint",
    [
        ('{"messages": [{"role": "user", "content": "Hi"}]}', "no assistant"),
        ('{"messages": [{"role": "bot", "content": "Hi"}]}', "'bot'"),
        ('{"messages": [{"role": "assistant", "content": null}]}', "string content"),
        ('{"messages": []}', "messages"),
        ('{"conversation": []}', "messages"),
        ('{"messages": [', "invalid JSON"),
    ],
)
def test_chat_errors(tmp_path, line, complaint):
    ok = '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}'
    path = write(tmp_path / "c.jsonl", ok + "\n" + line + "\n")
    user_error(read_chat, path, names=[f"{path}:2", complaint])


def test_chat_without_a_reply_is_read_for_predicting(tmp_path):
    line = '{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}'
    path = write(tmp_path / "c.jsonl", line + "\n")
    user_error(read_chat, path, names=[f"{path}:1", "no assistant"])
    [example] = read_chat(path, require_labels=False)
    assert [m["role"] for m in example.messages] == ["system", "user"]


def test_chat_empty_file(tmp_path):
    path = write(tmp_path / "c.jsonl.gz", "")
    user_error(read_chat, path, names=[path, "no examples"])
