"""An OpenAI-compatible HTTP gateway over the swarm: ``python -m swarm.api MODEL --initial-peers MADDR``.

- __main__.py: the command line; loads the tokenizer and the client model, serves the app with uvicorn
- app.py: ``Gateway`` (the routes: models, completions, chat completions, JSON or server-sent events) and
  ``build_app``
- schemas.py: request bodies validated with pydantic (OpenAI's parameters) and ``Limits``
- prompts.py: ``PromptBuilder``: prompts and chat conversations to token ids, checked against the limits
- generation.py: ``Generator``: each generation in a worker thread (its own inference session), text streamed
  back as decoded, stop strings, per-request seeds, cancellation when the client leaves
- errors.py: ``APIError`` and OpenAI-style error objects for every failure
"""
