from fedloop.cli import main

main()
