"""The application: RunConfig and run(), recipes and sweeps, commands, reports, publishing, the judge, the
quickstart and the ``gpt2lora`` command."""
