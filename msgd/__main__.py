from msgd.server.main import main

raise SystemExit(main())
