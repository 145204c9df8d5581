#!/usr/bin/env bash
# Wheels that lmforge needs and the device machine's image lacks (its Python is 3.12; it has
# torch 2.11, transformers, sacrebleu, prometheus-client, httpx, click, h11, numpy, scikit-learn).
# Run here, in the repo root; the device call then names .whl in `carry` (see bench/gpu/README.md).
set -euo pipefail
mkdir -p "$(git rev-parse --git-dir)/info"
grep -qx "/.whl/" "$(git rev-parse --git-dir)/info/exclude" 2>/dev/null || echo "/.whl/" >> "$(git rev-parse --git-dir)/info/exclude"
PY=${PYTHON:-.venv/bin/python}
rm -rf .whl  # wheels of an earlier pin would sit beside the new ones, and pip refuses two versions of a package
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.14.0 \
    fastapi==0.165.0 starlette==1.10.0 opentelemetry-api==1.45.2 annotated-doc==0.0.7 \
    pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 uvicorn==0.54.0 \
    typing-extensions==4.16.0 \
    gguf==0.19.0 nltk==3.10.4 defusedxml==0.7.1 \
    torchao==0.17.0  # for torch 2.11 (0.18 follows torch 2.13): train.fp8
# seqeval and rouge-score ship only source archives: build their (pure-Python) wheels here.
$PY -m pip wheel -q --no-deps -w .whl seqeval==1.2.2 rouge-score==0.1.2
du -sh .whl
