"""The `picogpt` subcommands, one module per group, each with its parser: `COMMANDS` maps a subcommand's
name to (parser(prog), command(args)). picogpt.cli holds the table of names and imports a module only
when one of its subcommands runs.

    generate.py    picogpt "prompt" (generate): greedy, sampling, beam search
    score.py       score: log-probability and perplexity of a text
    explain.py     explain (the web page of a forward pass), attention (pictures)
    corpus.py      score-corpus, complete-corpus (in process, or on Ray)
    models.py      verify, convert-tf, convert-hf, convert-dtype
    compare.py     parity, bench: picogpt against PyTorch
    arguments.py   what they share: the one-line parser, kinds of number, the model and sampling options
"""
