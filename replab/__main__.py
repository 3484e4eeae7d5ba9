from replab.cli import main

main()
