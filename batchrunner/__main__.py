from batchrunner.cli.main import main

raise SystemExit(main())
