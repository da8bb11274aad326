from moba_cli.cli import main

main()
