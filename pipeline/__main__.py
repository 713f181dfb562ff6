from pipeline.cli import main_exit

main_exit()
