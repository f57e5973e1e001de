"""Grading candidates by eye, and the grades back into training.

``candidates.py`` reads what ``lensray score`` wrote and puts it in the order a person grades it (by score,
by uncertainty, or both, with a blind random slice of low scores); ``grades.py`` owns the grades file (a
fsynced JSONL journal, the Parquet rebuilt from it atomically, merging graders, the labelled catalogue);
``images.py`` draws each band and a colour composite as PNG; ``server.py`` serves ``page.html`` on loopback.

A stage beside ``train`` (tests/test_layers.py): it reads ``sky`` and ``storage``, and nothing of ``train``
or ``evaluate``.
"""
