"""`python -m flexmoe` runs the command-line tool, like the `flexmoe` console script."""

from flexmoe.cli import app

app(prog_name="flexmoe")
