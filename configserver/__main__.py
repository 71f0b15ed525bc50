from configserver.cli.main import main

raise SystemExit(main())
