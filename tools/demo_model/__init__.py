"""Train picogpt's demo model, the small GPT-2 that ships in data/demo/ so picogpt runs with no download.

    apt-get install python3.11-doc                                  # the Python manual, as HTML (PSF licence)
    .venv/bin/python -m tools.demo_model --max-steps 3000           # checkpoints as it goes; run it again to resume
    .venv/bin/python -m tools.demo_model --judge data/demo/model.dat    # how its greedy text fails, counted
    .venv/bin/python -m tools.demo_model --help                     # every flag, explained

The model card, data/demo/README.md, gives the chain of commands that made the shipped model, and
docs/demo-model-history.md the runs that were tried and not shipped. The parts, in the order a run uses them:

    corpus          Python's docstrings and manual -> documents -> train/held-out split -> token streams
    training        the model, next-token loss, schedule, checkpoints, model.dat
    prefixes        what the sequence-level steps continue (windows, openings, first sentences)
    sequence_level  the steps that train a model on its own greedy continuations (--unlikelihood-from)
    judging         loops, early ends, nonsense and distinct continuations: what the card counts
    run             one training run, from the corpus to model.dat and the log
    __main__        the command line
"""
