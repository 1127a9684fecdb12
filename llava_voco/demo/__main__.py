from .mask import main

main()
