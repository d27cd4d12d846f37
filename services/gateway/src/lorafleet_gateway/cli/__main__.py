from lorafleet_gateway.cli.main import main

main()
