"""Raw text is split into words the way the tagging corpora (CoNLL, WNUT-17) write them."""

from lmforge.infer.pipeline import split_words


def test_split_words_follows_the_corpora_and_keeps_offsets():
    text = "I don't know John's @Suzie55 #NFL: 30,000 fans, 3.5 http://bit.ly/bgCyZ0 state-of-the-art!"
    spans = split_words(text)
    assert [text[a:b] for a, b in spans] == [
        "I", "do", "n't", "know", "John", "'s", "@Suzie55", "#NFL", ":", "30,000", "fans", ",", "3.5",
        "http://bit.ly/bgCyZ0", "state-of-the-art", "!",
    ]
    assert all(text[a:b].strip() == text[a:b] and a < b for a, b in spans)
    assert split_words("  ") == []
