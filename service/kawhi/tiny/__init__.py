"""kawhi-tiny: a synthetic visual task with exact ground truth, and the small model trained on it.

:mod:`kawhi.tiny.task` draws the scenes (shapes, bar charts), their questions, answers
and the pixel boxes of every object; :mod:`kawhi.tiny.responses` writes multi-paragraph
responses (right and wrong) and checks an answer, as an RL reward would. See docs/tiny.md.
"""
