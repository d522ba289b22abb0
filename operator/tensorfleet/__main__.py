from tensorfleet.cli import main

main()
