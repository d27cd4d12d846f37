from lorafleet_trainer.main import main

main()
