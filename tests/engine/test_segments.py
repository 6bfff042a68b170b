import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kawhi.engine.segments import Segment, segment_tokens, split_spans, token_segment_index


def offsets_of(pieces):
    """Hand-built tokenisation: consecutive pieces -> (text, offsets)."""
    offsets, pos = [], 0
    for p in pieces:
        offsets.append((pos, pos + len(p)))
        pos += len(p)
    return "".join(pieces), offsets


def texts(text, spans):
    return [text[s:e] for s, e in spans]


def seg_texts(text, segments):
    return [text[s.char_start : s.char_end] for s in segments]


def check_invariants(text, segments, num_tokens):
    if num_tokens == 0:
        assert segments == []
        return
    assert segments[0].char_start == 0 and segments[-1].char_end == len(text)
    assert segments[0].token_start == 0 and segments[-1].token_end == num_tokens
    for a, b in zip(segments, segments[1:]):
        assert a.char_end == b.char_start and a.token_end == b.token_start
    assert all(s.token_end > s.token_start for s in segments)
    ids = token_segment_index(segments, num_tokens)
    assert np.all(np.diff(ids) >= 0)


# ---- split_spans -----------------------------------------------------------


def test_paragraph_delimiter_belongs_to_the_paragraph_it_ends():
    text = "First para.\n\nSecond para.\n\nThird."
    assert texts(text, split_spans(text)) == ["First para.\n\n", "Second para.\n\n", "Third."]


def test_no_delimiter_is_one_paragraph():
    text = "one line\nanother line"
    assert split_spans(text) == [(0, len(text))]


def test_trailing_delimiter_gives_no_empty_paragraph():
    assert texts("A\n\nB\n\n", split_spans("A\n\nB\n\n")) == ["A\n\n", "B\n\n"]


def test_extra_newlines_and_indentation_join_the_preceding_paragraph():
    text = "A\n\n\n\n  B\n\n \n\nC"
    assert texts(text, split_spans(text)) == ["A\n\n\n\n  ", "B\n\n \n\n", "C"]


def test_leading_blank_text_joins_the_first_paragraph():
    text = "\n\n  \n\nA\n\nB"
    assert texts(text, split_spans(text)) == ["\n\n  \n\nA\n\n", "B"]


def test_single_newline_and_other_separators_are_not_delimiters():
    for text in ("A\nB", "A\n \nB", "A\r\n\r\nB"):
        assert split_spans(text) == [(0, len(text))]


@pytest.mark.parametrize("text", ["", "   ", "\n\n", "\n\n\n \n\n"])
def test_contentless_text_is_one_span(text):
    assert split_spans(text) == [(0, len(text))]
    assert split_spans(text, "sentence") == [(0, len(text))]


def test_sentences():
    text = 'Hi there. How are you?! I said "fine." Then\nnext line... ok'
    assert texts(text, split_spans(text, "sentence")) == [
        "Hi there. ",
        "How are you?! ",
        'I said "fine." ',
        "Then\n",
        "next line... ",
        "ok",
    ]


def test_sentence_needs_whitespace_after_ascii_ender():
    text = "pi = 3.14 and e.g.x stay whole"
    assert split_spans(text, "sentence") == [(0, len(text))]


def test_cjk_sentences_split_without_whitespace():
    text = "你好。我很好！你呢？ 好"
    assert texts(text, split_spans(text, "sentence")) == ["你好。", "我很好！", "你呢？ ", "好"]


def test_split_spans_rejects_token_and_unknown():
    with pytest.raises(ValueError):
        split_spans("a", "token")
    with pytest.raises(ValueError):
        split_spans("a", "chapter")


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet="ab .!?。\n\t", max_size=40), st.sampled_from(["paragraph", "sentence"]))
def test_spans_cover_text_contiguously(text, granularity):
    spans = split_spans(text, granularity)
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert all(s < e for s, e in spans) or text == ""
    if len(spans) > 1:
        assert all(text[s:e].strip() for s, e in spans)


# ---- segment_tokens: paragraphs --------------------------------------------


def test_tokens_follow_their_paragraph():
    text, offs = offsets_of(["The", " cat", ".", "\n\n", "A", " dog", "."])
    segs = segment_tokens(text, offs)
    assert segs == [Segment(0, 10, 0, 4), Segment(10, len(text), 4, 7)]
    assert token_segment_index(segs, 7).tolist() == [0, 0, 0, 0, 1, 1, 1]


def test_token_straddling_delimiter_before():
    # ".\n\n" starts with "." -> ends paragraph 0
    text, offs = offsets_of(["Cat", ".\n\n", "Dog"])
    segs = segment_tokens(text, offs)
    assert [(s.token_start, s.token_end) for s in segs] == [(0, 2), (2, 3)]
    assert seg_texts(text, segs) == ["Cat.\n\n", "Dog"]


def test_token_straddling_delimiter_after():
    # "\n\nThe" starts with whitespace; its first letter is in paragraph 1
    text, offs = offsets_of(["Cat", ".", "\n\nThe", " dog"])
    segs = segment_tokens(text, offs)
    assert [(s.token_start, s.token_end) for s in segs] == [(0, 2), (2, 4)]
    assert seg_texts(text, segs) == ["Cat.\n\n", "The dog"]


def test_whitespace_only_tokens_stay_with_the_paragraph_they_end():
    text, offs = offsets_of(["A", "\n\n\n", "\n", "B", "\n\n"])
    segs = segment_tokens(text, offs)
    assert [(s.token_start, s.token_end) for s in segs] == [(0, 3), (3, 5)]
    assert seg_texts(text, segs) == ["A\n\n\n\n", "B\n\n"]


def test_paragraph_inside_one_token_is_merged_into_previous():
    # The token ".\n\nB\n\n" is anchored at "." (paragraph 0) and swallows all of
    # paragraph 1, which then has no tokens and folds into paragraph 0.
    text, offs = offsets_of(["A", ".\n\nB\n\n", "C"])
    assert texts(text, split_spans(text)) == ["A.\n\n", "B\n\n", "C"]
    segs = segment_tokens(text, offs)
    assert segs == [Segment(0, 7, 0, 2), Segment(7, 8, 2, 3)]


def test_leading_paragraph_without_tokens_joins_the_first():
    # Offsets need not cover the text: the first paragraph gets no token.
    text = "Intro\n\nBody text"
    offs = [(7, 11), (11, 16)]
    segs = segment_tokens(text, offs)
    assert segs == [Segment(0, len(text), 0, 2)]


def test_no_delimiter_and_trailing_delimiter():
    text, offs = offsets_of(["Just", " one", " paragraph", "."])
    assert segment_tokens(text, offs) == [Segment(0, len(text), 0, 4)]
    text, offs = offsets_of(["One", ".", "\n\n"])
    assert segment_tokens(text, offs) == [Segment(0, len(text), 0, 3)]


def test_empty_width_tokens_go_with_previous_or_first():
    text = "A\n\nB"
    # <bos> (0,0), "A", "\n\n", "B", <eos> (4,4), <pad> (4,4)
    offs = [(0, 0), (0, 1), (1, 3), (3, 4), (4, 4), (4, 4)]
    segs = segment_tokens(text, offs)
    assert segs == [Segment(0, 3, 0, 3), Segment(3, 4, 3, 6)]
    # a special token right after the delimiter stays in the paragraph that ended
    offs = [(0, 1), (1, 3), (3, 3), (3, 4)]
    assert token_segment_index(segment_tokens(text, offs), 4).tolist() == [0, 0, 0, 1]


def test_only_empty_width_tokens():
    assert segment_tokens("", [(0, 0), (0, 0)]) == [Segment(0, 0, 0, 2)]
    assert segment_tokens("A\n\nB", [(0, 0)]) == [Segment(0, 4, 0, 1)]


def test_zero_tokens():
    assert segment_tokens("A\n\nB", []) == []
    assert segment_tokens("", []) == []
    assert token_segment_index([], 0).shape == (0,)


def test_cjk_paragraphs():
    text, offs = offsets_of(["你好", "。", "\n\n", "世界", "很大", "。"])
    segs = segment_tokens(text, offs)
    assert seg_texts(text, segs) == ["你好。\n\n", "世界很大。"]
    assert [(s.token_start, s.token_end) for s in segs] == [(0, 3), (3, 6)]


def test_emoji_split_across_byte_tokens_share_a_char():
    # "Hi 😀\n\nBye": byte-level BPE splits the 4-byte emoji into two tokens whose
    # offsets both cover the emoji's single code point (3, 4).
    text = "Hi 😀\n\nBye"
    assert len(text) == 9
    offs = [(0, 2), (2, 4), (3, 4), (4, 6), (6, 9)]
    segs = segment_tokens(text, offs)
    check_invariants(text, segs, 5)
    assert token_segment_index(segs, 5).tolist() == [0, 0, 0, 0, 1]
    assert seg_texts(text, segs) == ["Hi 😀\n\n", "Bye"]


def test_combining_marks():
    # "e" + COMBINING ACUTE is two code points; a token may start at the mark.
    text = "Cafe\u0301.\n\nOk"
    offs = [(0, 4), (4, 5), (5, 6), (6, 8), (8, 10)]
    segs = segment_tokens(text, offs)
    assert token_segment_index(segs, 5).tolist() == [0, 0, 0, 0, 1]
    assert seg_texts(text, segs) == ["Cafe\u0301.\n\n", "Ok"]


def test_empty_paragraph_between_delimiters():
    text, offs = offsets_of(["A", "\n\n", "\n\n", "\n\n", "B"])
    segs = segment_tokens(text, offs)
    assert seg_texts(text, segs) == ["A\n\n\n\n\n\n", "B"]
    assert [(s.token_start, s.token_end) for s in segs] == [(0, 4), (4, 5)]


def test_segment_ids_forced_monotone():
    # Overlapping (pathological) offsets whose anchors go backwards: token 1 is
    # anchored in paragraph 1, token 2 would be in paragraph 0 -> kept in 1.
    text = "A\n\nB C"
    offs = [(0, 1), (1, 4), (2, 3), (4, 6)]
    ids = token_segment_index(segment_tokens(text, offs), 4)
    assert ids.tolist() == [0, 1, 1, 1]


# ---- sentences and tokens ----------------------------------------------------


def test_sentence_tokens_with_leading_spaces():
    text, offs = offsets_of(["Hello", " world", ".", " How", " are", " you", "?", "\n", "Fine"])
    segs = segment_tokens(text, offs, "sentence")
    assert seg_texts(text, segs) == ["Hello world. ", "How are you?\n", "Fine"]
    assert token_segment_index(segs, 9).tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 2]


def test_token_granularity():
    text = " Hi 😀!"
    # a leading space not covered by any token; emoji split across two tokens; <eos>
    offs = [(1, 3), (3, 5), (4, 5), (5, 6), (6, 6)]
    segs = segment_tokens(text, offs, "token")
    assert [(s.token_start, s.token_end) for s in segs] == [(i, i + 1) for i in range(5)]
    assert seg_texts(text, segs) == [" Hi", " 😀", "", "!", ""]
    check_invariants(text, segs, 5)


# ---- validation and properties ------------------------------------------------


@pytest.mark.parametrize(
    "offs",
    [[(0, 5)], [(-1, 1)], [(2, 1)], [(2, 3), (1, 2)], [(0, 1, 2)], [("a", 1)]],
)
def test_bad_offsets(offs):
    with pytest.raises(ValueError):
        segment_tokens("abcd", offs)


def test_unknown_granularity():
    with pytest.raises(ValueError):
        segment_tokens("a", [(0, 1)], "word")


def test_token_segment_index_rejects_gaps():
    with pytest.raises(ValueError):
        token_segment_index([Segment(0, 1, 0, 1), Segment(1, 2, 2, 3)], 3)
    with pytest.raises(ValueError):
        token_segment_index([Segment(0, 1, 0, 1)], 2)
    with pytest.raises(ValueError):
        token_segment_index([Segment(0, 1, 0, 0)], 0)


@st.composite
def tokenised(draw):
    pieces = draw(st.lists(st.text(alphabet="ab .\n好😀", min_size=0, max_size=4), max_size=12))
    text, offs = offsets_of(pieces)
    return text, offs


@settings(max_examples=150, deadline=None)
@given(tokenised(), st.sampled_from(["paragraph", "sentence", "token"]))
def test_segments_cover_tokens_and_chars(data, granularity):
    text, offs = data
    segs = segment_tokens(text, offs, granularity)
    check_invariants(text, segs, len(offs))
    if granularity == "paragraph" and segs:
        # every segment boundary is a paragraph boundary
        starts = {s for s, _ in split_spans(text)}
        assert all(s.char_start in starts for s in segs)
