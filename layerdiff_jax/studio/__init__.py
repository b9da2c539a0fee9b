"""The layer studio: a local web page to make, inspect and edit layered images (`scripts/studio.py`).

- `documents`: each result is a document, a history of `LayeredSample` versions (undo/redo), every version
  written to the studio's output folder as an exchange-format folder as soon as it exists;
- `jobs`: one worker thread runs requests from every tab in order through one loaded model, so that JAX runs
  on one thread and programs compiled for one request serve the next;
- `server`: the HTTP API and the static page (`static/`), served by the standard library (no framework, no
  assets from the internet).
"""
