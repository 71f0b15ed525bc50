from configserver.cli import main

raise SystemExit(main())
